#!/bin/bash
# Slurm Epilog for the node-daemon pattern: remove the shared-memory rings that the job's
# processes left in /dev/shm when they were killed (SIGKILL, OOM, time limit) before they could
# close their spools. A ring is /dev/shm/matspool-<pid>-<token>; it is removed only when it
# belongs to the job's user and process <pid> no longer exists, so rings of the same user's
# other jobs on this node stay. (With job_container/tmpfs, /dev/shm is private to the job and
# goes with it; this script then finds nothing.)
#
#   slurm.conf:  Epilog=/etc/slurm/epilog.d/*     (install as /etc/slurm/epilog.d/50-matspool.sh)
#
# Runs as root (SlurmdUser). Always exits 0: a failed cleanup must not drain the node.
set -u
shopt -s nullglob

uid=${SLURM_JOB_UID:-}
if [[ ! $uid =~ ^[0-9]+$ ]]; then
  echo "matspool epilog: SLURM_JOB_UID is not set; nothing removed" >&2
  exit 0
fi

for ring in /dev/shm/matspool-*; do
  name=${ring##*/}
  pid=${name#matspool-}
  pid=${pid%%-*}
  [[ $pid =~ ^[0-9]+$ ]] || continue
  [[ -f $ring && ! -L $ring ]] || continue
  [[ $(stat -c %u -- "$ring" 2>/dev/null) == "$uid" ]] || continue
  # alive: its /proc entry exists (root sees every process) or it takes a signal
  if [[ -e /proc/$pid ]] || kill -0 "$pid" 2>/dev/null; then
    continue
  fi
  if rm -f -- "$ring"; then
    echo "matspool epilog: removed stale ring $name of uid $uid"
  fi
done
exit 0

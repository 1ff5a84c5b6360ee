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
# Then it tells the node daemon (matspool node) that the job ended: the user's writer leaves at
# once if none of the user's processes on the node is still connected to it (it would leave by
# itself after --idle-exit seconds anyway).
#
# Runs as root (SlurmdUser). Always exits 0: a failed cleanup must not drain the node.
# Settings (the defaults below; as in prolog.sh, MATSPOOL_ENDPOINT and MATSPOOL_PYTHON in its
# environment override them):
#   endpoint      the node daemon's endpoint                (ipc:///run/matspool/matspool.sock)
#   install_dir   the venv matspool is installed in (deploy/README.md)          (/opt/matspool)
set -u
shopt -s nullglob

endpoint=${MATSPOOL_ENDPOINT:-ipc:///run/matspool/matspool.sock}
install_dir=/opt/matspool

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

# The node daemon's handshake socket: release the user's writer (best effort, 10 s at most).
hello=${endpoint#ipc://}.hello
if [[ $endpoint == ipc://* && -S $hello ]]; then
  if [[ -n ${MATSPOOL_PYTHON:-} ]]; then
    python=$MATSPOOL_PYTHON
  elif [[ -x $install_dir/bin/python3 ]]; then
    python=$install_dir/bin/python3
  else
    python=$(PATH=${PATH:-/usr/local/bin:/usr/bin:/bin} command -v python3) || python=
  fi
  release='
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(json.dumps({"op": "RELEASE_USER", "uid": int(sys.argv[2])}).encode() + b"\n")
print(s.makefile().readline().strip())
'
  if [[ -n $python ]] && ! msg=$(timeout 10 "$python" -c "$release" "$hello" "$uid" 2>&1); then
    echo "matspool epilog: could not release uid $uid's writer: ${msg:-no output}" >&2
  fi
fi
exit 0

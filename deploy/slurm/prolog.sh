#!/bin/bash
# Slurm Prolog for the node-daemon pattern (the daemon runs under systemd as deploy/systemd/
# matspool.service): before a job starts, check that the node's matspool daemon exists and
# answers a PING. A non-zero exit makes Slurm drain the node and requeue the job, so a node
# whose daemon is down takes no jobs until an administrator looks (systemctl status matspool).
#
#   slurm.conf:  Prolog=/etc/slurm/prolog.d/*     (install as /etc/slurm/prolog.d/50-matspool.sh)
#
# Settings: edit the defaults below. Slurm runs a prolog with an environment of its own (the
# job's SLURM_* variables), not slurmd's: variables set for slurmd do not reach this script.
# (Set in its environment, e.g. by a test, MATSPOOL_ENDPOINT, MATSPOOL_PYTHON and
# MATSPOOL_PING_TIMEOUT still override them.)
#   endpoint      the daemon's endpoint                     (ipc:///run/matspool/matspool.sock)
#   install_dir   the venv matspool is installed in (deploy/README.md)          (/opt/matspool)
#   timeout_s     seconds to wait for the answer                                              (5)
# The check runs install_dir's python; without one, the python beside the `matspool` command
# on PATH (symlinks followed: /usr/local/bin/matspool -> /opt/matspool/bin/matspool).
set -u

endpoint=${MATSPOOL_ENDPOINT:-ipc:///run/matspool/matspool.sock}
install_dir=/opt/matspool
timeout_s=${MATSPOOL_PING_TIMEOUT:-5}

# One PING in the daemon's protocol (two frames: tag, JSON); success only on a PONG.
ping='
import json, sys
import zmq
endpoint, timeout_ms = sys.argv[1], int(float(sys.argv[2]) * 1000)
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
sock.send_multipart([b"matspool/1", json.dumps({"op": "PING"}).encode()])
if not sock.poll(timeout_ms):
    sys.exit(f"no answer from {endpoint} within {timeout_ms} ms")
frames = sock.recv_multipart()
if len(frames) != 2 or frames[0] != b"matspool/1" or json.loads(frames[1]).get("op") != "PONG":
    sys.exit(f"unexpected answer from {endpoint}: {frames!r}")
'

fail() {
  echo "matspool prolog: $*" >&2
  exit 1
}

# The interpreter: install_dir's, else the one beside `matspool` (a prolog may get no PATH).
if [[ -n ${MATSPOOL_PYTHON:-} ]]; then
  python=$MATSPOOL_PYTHON
elif [[ -x $install_dir/bin/python3 ]]; then
  python=$install_dir/bin/python3
elif exe=$(PATH=${PATH:-/usr/local/bin:/usr/bin:/bin} command -v matspool) &&
  [[ -x $(dirname -- "$(readlink -f -- "$exe")")/python3 ]]; then
  python=$(dirname -- "$(readlink -f -- "$exe")")/python3
else
  fail "no python with matspool: nothing in $install_dir (deploy/README.md installs it there)" \
    "and no matspool command on PATH; install it, or set install_dir in this script"
fi

if [[ $endpoint == ipc://* ]]; then
  socket=${endpoint#ipc://}
  [[ -S $socket ]] || fail "no daemon socket at $socket (systemctl status matspool)"
fi
# timeout(1) guards against a python that hangs before its own deadline
if ! msg=$(timeout "$((${timeout_s%.*} + 10))" "$python" -c "$ping" "$endpoint" "$timeout_s" 2>&1); then
  fail "daemon at $endpoint does not answer: ${msg:-no output}"
fi
exit 0

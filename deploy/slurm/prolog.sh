#!/bin/bash
# Slurm Prolog for the node-daemon pattern (the daemon runs under systemd as deploy/systemd/
# matspool.service): before a job starts, check that the node's matspool daemon exists and
# answers a PING. A non-zero exit makes Slurm drain the node and requeue the job, so a node
# whose daemon is down takes no jobs until an administrator looks (systemctl status matspool).
#
#   slurm.conf:  Prolog=/etc/slurm/prolog.d/*     (install as /etc/slurm/prolog.d/50-matspool.sh)
#
# Settings (environment of slurmd, or edit the defaults here):
#   MATSPOOL_ENDPOINT      the daemon's endpoint   (ipc:///run/matspool/matspool.sock)
#   MATSPOOL_PYTHON        a python with pyzmq, e.g. the one matspool is installed in (python3)
#   MATSPOOL_PING_TIMEOUT  seconds to wait for the answer (5)
set -u

endpoint=${MATSPOOL_ENDPOINT:-ipc:///run/matspool/matspool.sock}
timeout_s=${MATSPOOL_PING_TIMEOUT:-5}
python=${MATSPOOL_PYTHON:-python3}

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

if [[ $endpoint == ipc://* ]]; then
  socket=${endpoint#ipc://}
  [[ -S $socket ]] || fail "no daemon socket at $socket (systemctl status matspool)"
fi
# timeout(1) guards against a python that hangs before its own deadline
if ! msg=$(timeout "$((${timeout_s%.*} + 10))" "$python" -c "$ping" "$endpoint" "$timeout_s" 2>&1); then
  fail "daemon at $endpoint does not answer: ${msg:-no output}"
fi
exit 0

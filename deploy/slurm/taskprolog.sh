#!/bin/bash
# Slurm TaskProlog for the node-daemon pattern: point every task at the node's daemon.
# Slurm reads this script's standard output: "export NAME=value" sets NAME in the task's
# environment, "print TEXT" writes TEXT to the task's standard output.
#
#   slurm.conf:  TaskProlog=/etc/slurm/taskprolog.sh
#
# A MATSPOOL_ENDPOINT the user set (a per-job daemon, say) is left alone. When the node has no
# daemon socket nothing is exported, and each spool starts its own embedded daemon instead.
socket=${MATSPOOL_NODE_SOCKET:-/run/matspool/matspool.sock}

if [[ -n ${MATSPOOL_ENDPOINT:-} ]]; then
  exit 0
fi
if [[ -S $socket ]]; then
  echo "export MATSPOOL_ENDPOINT=ipc://$socket"
else
  echo "print matspool: no node daemon at $socket; spools will start their own"
fi
exit 0

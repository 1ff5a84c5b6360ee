#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine whose image has torch, numpy, scipy and
# h5py but not our other dependencies. Here, once, in the repository root:
#   bash ../shared/device/fetch-wheels.sh pytest pluggy iniconfig
# then on the GPU machine (carry .whl/), from the repository root:
#   bash tests/gpu/device_check.sh            # results in $OUT (default ./gpu-out)
# Stages are bounded so the whole call stays under about 8 minutes; each stage's output
# and exit status land in $OUT even when a later one fails or times out.
set -uo pipefail
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$out/FAILED"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/client:$PWD/service:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
fi

stage() {  # stage NAME SECONDS CMD...: run, keep the output and the status
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc ${secs}s-limit took=$((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
  >"$out/machine.txt" 2>&1
stage gpu-tests 180 "$py" -m pytest -q -p no:cacheprovider -rs tests/gpu
stage d2h 60 "$py" tests/gpu/measure_d2h.py "$out/d2h.json"
stage bench 300 "$py" -m bench --json "$out/bench.json" --dir "${BENCH_DIR:-/tmp}"
cat "$out/summary.txt"

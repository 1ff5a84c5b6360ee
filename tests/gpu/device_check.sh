#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine whose image has torch, numpy, scipy and
# h5py (Python 3.12) but not our other dependencies nor pytest's. Here, once, in the
# repository root (the wheels land in .whl/, which git ignores):
#   bash ../shared/device/fetch-wheels.sh pytest pluggy iniconfig packaging pygments
# then on the GPU machine (carry .whl/), from the repository root:
#   bash tests/gpu/device_check.sh            # results in $OUT (default ./gpu-out)
#
# Budget: a lent machine has 15 minutes of device time for every try together, and starting
# it takes some. So the whole script stops itself after $DEADLINE seconds (default 330) and
# every stage's limit is cut to what is left: a failed run leaves room for a rerun. Each
# stage's output, exit status and time land in $OUT as soon as it ends, even when a later
# one fails or times out; the bench runs only its GPU rows, one measurement per call, so
# each JSON file is written as its row finishes.
set -uo pipefail
here=$(pwd)
out=${OUT:-$here/gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
deadline=$((SECONDS + ${DEADLINE:-330}))

# the import path, always: the client, the service, the tests' helpers (readback, conftest)
site=/tmp/matspool-site
export PYTHONPATH=$site:$here/client:$here/service:$here/tests${PYTHONPATH:+:$PYTHONPATH}
need="pyzmq hdf5storage mat73 pymatreader xmltodict pytest pluggy iniconfig packaging pygments"
if [ -d .whl ]; then
  missing=""
  shopt -s nocaseglob nullglob
  for w in $need; do
    found=(.whl/"${w//-/_}"-*.whl)
    [ ${#found[@]} -gt 0 ] || missing="$missing $w"
  done
  shopt -u nocaseglob nullglob
  [ -z "$missing" ] || echo "warning: .whl/ lacks:$missing (the image may have them)" | tee -a "$out/summary.txt"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    >"$out/wheels.txt" 2>&1 || { echo "wheel install failed" | tee "$out/FAILED"; exit 1; }
fi
"$py" - >"$out/imports.txt" 2>&1 <<'EOF' || { cat "$out/imports.txt"; echo "imports failed" | tee "$out/FAILED"; exit 1; }
import importlib
for m in ("torch", "numpy", "scipy", "h5py", "zmq", "pytest", "pluggy", "iniconfig", "packaging",
          "pygments", "matspool", "matspoold", "readback"):
    importlib.import_module(m)
print("all imports ok")
EOF

stage() {  # stage NAME SECONDS CMD...: run within what is left of the deadline, keep output and status
  local name=$1 secs=$2
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "$name skipped: deadline reached" | tee -a "$out/summary.txt"
    return
  fi
  [ "$secs" -le "$left" ] || secs=$left
  local t0=$SECONDS
  timeout --kill-after=5 "$secs" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc ${secs}s-limit took=$((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  ulimit -l; df -h /dev/shm; } >"$out/machine.txt" 2>&1
# the claims of issue 16 first: they are what a short run must not miss
stage gpu-pipeline 150 "$py" -m pytest -q -p no:cacheprovider -rs --durations=10 \
  --junitxml="$out/gpu-pipeline.xml" tests/gpu/test_cuda_pipeline.py
stage gpu-tests 120 "$py" -m pytest -q -p no:cacheprovider -rs --durations=10 \
  --junitxml="$out/gpu-tests.xml" tests/gpu/test_cuda.py tests/gpu/test_cuda_sparse.py
stage gpu-sharded 60 "$py" -m pytest -q -p no:cacheprovider -rs --durations=5 \
  --junitxml="$out/gpu-sharded.xml" tests/gpu/test_cuda_sharded.py
stage d2h 40 "$py" tests/gpu/measure_d2h.py "$out/d2h.json"
stage bench-d2h 30 "$py" -m bench --quick --only d2h --json "$out/bench-d2h.json" --dir "${BENCH_DIR:-/tmp}"
stage bench-stall 60 "$py" -m bench --quick --only stall --json "$out/bench-stall.json" --dir "${BENCH_DIR:-/tmp}"
cat "$out/summary.txt"

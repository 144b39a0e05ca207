#!/usr/bin/env bash
# One check of a GPU machine (benchmarks/gpu_check.py says what it runs; docs/gpu.md):
#   benchmarks/gpu_check.sh --wheels DIR      # pip install --no-deps DIR/*.whl and clipft, then check
#   benchmarks/gpu_check.sh --cpu-smoke       # every stage on a CPU at the smallest sizes
# Nothing is downloaded: the wheels clipft needs beyond the machine's own torch, lightning, peft,
# torchmetrics, transformers, timm (open_clip_torch, omegaconf, webdataset, deepspeed, and
# optionally open_clip_train's) come in DIR; the torch pin is not forced (--no-deps).
# Other arguments go to gpu_check.py (--out-dir DIR, --recipes ...). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
wheels=""
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --wheels) wheels=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -n $wheels ]]; then
  shopt -s nullglob
  found=("$wheels"/*.whl)
  [[ ${#found[@]} -gt 0 ]] || { echo "gpu_check.sh: no .whl files in $wheels" >&2; exit 2; }
  "$python" -m pip install --no-index --no-deps "${found[@]}"
  "$python" -m pip install --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_check.sh: clipft not installed (setuptools missing?); using it from $PWD through PYTHONPATH" >&2
fi
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$python" benchmarks/gpu_check.py "${args[@]}"

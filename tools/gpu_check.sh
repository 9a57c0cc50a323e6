#!/usr/bin/env bash
# The GPU device check, in one call of at most 8 minutes on one GPU (docs: BENCHMARKS.md, "GPU device check").
#
#   bash tools/gpu_check.sh            # on the device machine, after the parts of tools/pack_gpu_env.sh are in /tmp/gw
#   DEV=cpu bash tools/gpu_check.sh    # the dry run (CI): .venv's Python, the CPU, tiny sizes, the same steps
#
# Steps: unpack the packed site folder (once per machine), the import check with versions, the CUDA-marked tests
# (tests/test_gpu.py), then tools/gpu_check.py's measurements. Figures go to $OUT/summary.md (OUT defaults to
# ./gpu-check-out); each step is bounded, and a failed step is reported without stopping the others.
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=${DEV:-cuda}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
slack=1  # the step limits below are the GPU's; the CPU dry run is slower and may share its machine
if [ "$DEV" = cpu ]; then
  PY=${PYTHON:-.venv/bin/python}
  slack=4
  export PATH=$PWD/.venv/bin:$PATH  # the venv's ninja, as the tests use: another one rebuilds DeepSpeed's CPU op
  export AUGSSL_DEVICE=cpu DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
else
  PY=${PYTHON:-python3}
  if [ ! -d /tmp/site ]; then
    ls /tmp/gw/part-* >/dev/null 2>&1 || { echo "gpu_check: no /tmp/gw/part-*: copy the parts of tools/pack_gpu_env.sh first"; exit 2; }
    cat /tmp/gw/part-* | xz -d | tar -x -C /tmp || { echo "gpu_check: the packed site folder does not unpack"; exit 2; }
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} AUGSSL_DEVICE=cuda
  unset DS_ACCELERATOR
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/augssl_torch_ext}
status=0
step() {  # step NAME SECONDS COMMAND...: bounded, logged to $OUT/NAME.log, its outcome in the summary
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$((limit * slack))" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc $rc | $((SECONDS - start)) s |" >> "$OUT/steps.md"
  tail -n 30 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
echo "| step | outcome | time |" > "$OUT/steps.md"
echo "|---|---|---|" >> "$OUT/steps.md"
step imports 60 "$PY" -c "import torch, deepspeed, nvidia.dali, hydra, webdataset, pytest
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print('dali', nvidia.dali.__version__, 'deepspeed', deepspeed.__version__, 'hydra', hydra.__version__)"
step gpu_tests 120 "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider
step measurements 300 "$PY" tools/gpu_check.py --device "$DEV" --out "$OUT"
cat "$OUT/steps.md"
exit $status

#!/usr/bin/env bash
# The one setup path: a virtual environment in .venv with torch (pinned, CPU wheel) first, then the project.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test,demo   or   scripts/setup.sh gpu-cu13
# DALI comes from the extra gpu-cu12 (CUDA 12, and the CPU backend) or gpu-cu13 (CUDA 13); gpu-cu12 unless named.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
case ",$extras," in
  *,gpu-cu12,*|*,gpu-cu13,*) ;;
  *) extras="$extras,gpu-cu12" ;;
esac
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
# torch first and pinned: anything unpinned would resolve a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[${extras}]"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
# Without CUDA, DeepSpeed runs its collectives through a small C++ op it compiles on first use (about 25 s on 2
# cores). Build it now, into $TORCH_EXTENSIONS_DIR (the Makefile points it into .venv), with the venv's ninja, so the
# first training run does not stall on a compiler.
no_cuda='import sys, torch; sys.exit(int(torch.cuda.is_available()))'  # succeeds where there is no CUDA
if [ -n "${TORCH_EXTENSIONS_DIR:-}" ] && .venv/bin/python -c "$no_cuda"; then
  PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu .venv/bin/python -c \
    'from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)' \
    > /dev/null
  echo "setup: DeepSpeed's CPU op built in $TORCH_EXTENSIONS_DIR"
fi

#!/usr/bin/env bash
# Create (or update) ./.venv with palionnx installed.
#   scripts/setup.sh          runtime + export (torch, transformers): what `palionnx caption` needs to
#                             export a hub model on first use
#   scripts/setup.sh dev      the same + pytest, ruff, mypy
# PyTorch: the CUDA build where an NVIDIA GPU is present, otherwise the CPU build (a CUDA build is
# several GB that a CPU-only machine never uses).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="export"
[ "${1:-}" = "dev" ] && extras="export,dev"
TORCH_VERSION="2.13.0"

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
    python -m pip install --quiet "torch==$TORCH_VERSION"
  elif python -m pip install --quiet --no-index --no-deps "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    echo "setup: no GPU: installed the CPU build of torch $TORCH_VERSION found locally"
  else
    echo "setup: no GPU: installing the CPU build of torch $TORCH_VERSION from PyTorch's CPU index"
    python -m pip install --quiet "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install --quiet -e ".[$extras]"
echo "setup: ready (.venv, extras: $extras)"

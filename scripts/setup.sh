#!/usr/bin/env bash
# Create (or update) ./.venv with palionnx installed; does nothing when it is already up to date.
#   scripts/setup.sh          runtime + export (torch, transformers): what `palionnx caption` needs to
#                             export a hub checkpoint on first use
#   scripts/setup.sh dev      the same + pytest, ruff, mypy, hypothesis, Ray
# onnxruntime flavour: the GPU build (onnxruntime-gpu with its CUDA and cuDNN wheels) where `nvidia-smi`
# sees a GPU -- the CUDA 13 build for drivers >= 580, else the CUDA 12 one -- and the CPU build otherwise.
# PALIONNX_FLAVOUR=cpu|gpu|gpu-cu12 overrides. PyTorch (export only) follows the same rule.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"

flavour="${PALIONNX_FLAVOUR:-}"
if [ -z "$flavour" ]; then
  flavour=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | cut -d. -f1)"
    if [ "${driver:-0}" -ge 580 ] 2>/dev/null; then flavour=gpu; else flavour=gpu-cu12; fi
  fi
fi
extras="$flavour,export"
[ "${1:-}" = "dev" ] && extras="$extras,dev"

# Up to date: the same pyproject.toml, version and setup script, and these extras (or more) installed before.
stamp=.venv/.palionnx-setup
digest="$(cat pyproject.toml src/palionnx/version.py "$0" | cksum | cut -d' ' -f1)"
if [ -x .venv/bin/palionnx ] && [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$digest" ]; then
  installed="$(tail -n1 "$stamp")"
  missing=""
  for extra in ${extras//,/ }; do
    case ",$installed," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
  done
  if [ -z "$missing" ]; then
    echo "setup: .venv is up to date (extras: $installed)"
    exit 0
  fi
  extras="$installed,${missing// /,}"
  extras="${extras//,,/,}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

# onnxruntime and onnxruntime-gpu install the same module: never leave both.
case "$flavour" in
  cpu) other=onnxruntime-gpu ;;
  *) other=onnxruntime ;;
esac
if python -m pip show --quiet "$other" >/dev/null 2>&1; then
  echo "setup: removing $other (it would overwrite the $flavour build of onnxruntime)"
  python -m pip uninstall --quiet --yes "$other"
fi

if ! python -c "import torch" 2>/dev/null; then
  if [ "$flavour" != cpu ]; then
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
printf '%s\n%s\n' "$digest" "$extras" > "$stamp"
echo "setup: ready (.venv, extras: $extras); run \`. .venv/bin/activate\` to put palionnx on your PATH"

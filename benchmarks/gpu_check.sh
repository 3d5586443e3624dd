#!/usr/bin/env bash
# One prepared CUDA check for a lent GPU machine (see benchmarks/gpu_check.py). Run from the repo root:
#   bash benchmarks/gpu_check.sh
# Synthesises a pg1-3b-224 checkpoint, exports it at fp16 and int4, captions with device="cuda",
# checks that no MatMulNBits fell back to the CPU provider, and prints ms/token.
set -euo pipefail
work="${WORK:-/tmp/palionnx-gpu}"
mkdir -p "$work"
python -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install --quiet torch==2.13.0 && pip install --quiet -e ".[export]"
pip uninstall --quiet -y onnxruntime && pip install --quiet onnxruntime-gpu nvidia-cudnn-cu12 nvidia-cublas-cu12
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
palionnx synth pg1-3b-224 -o "$work/ckpt" --dtype bfloat16
for q in fp16 int4; do
  /usr/bin/time -f "export $q: %e s, peak RSS %M KB" palionnx export "$work/ckpt" -o "$work/$q" --quant "$q"
done
python benchmarks/gpu_check.py "$work/fp16" "$work/int4"

#!/usr/bin/env bash
# The CUDA check on a lent (offline) GPU machine, with ../shared/gpu bringing onnxruntime-gpu in four pieces.
#   here:        bash ../shared/gpu/pack.sh
#   run call 1:  carry [".gpu/c1"]:  bash .gpu/c1/start.sh 'bash benchmarks/gpu_check.sh prep'
#   run call 2:  carry [".gpu/c2"]:  cp .gpu/c2/part /tmp/gpu/part2
#   run call 3:  carry [".gpu/c3"]:  cp .gpu/c3/part /tmp/gpu/part3
#   run call 4:  carry [".gpu/c4"]:  cp .gpu/c4/part /tmp/gpu/part4 && bash benchmarks/gpu_check.sh measure
# prep (started detached by call 1, on the machine's CPUs while the pieces arrive) synthesises pg1-3b-224 and
# the tiny test models and exports them for CUDA; measure waits for it and runs benchmarks/gpu_check.py,
# which prints every figure of the README's GPU table and writes them under $OUT.
set -euo pipefail
work=/tmp/gpu/work
case "${1:-}" in
  prep)
    mkdir -p "$work"
    python3 -m palionnx synth pg1-3b-224 -o "$work/pg1-3b-224" --dtype bfloat16
    for family in tiny-pg1 tiny-pg2; do python3 -m palionnx synth "$family" -o "$work/$family"; done
    pids=()
    python3 -m palionnx export "$work/pg1-3b-224" -o "$work/pg1-3b-224-fp16" --quant fp16 & pids+=($!)
    python3 -m palionnx export "$work/pg1-3b-224" -o "$work/pg1-3b-224-int4" --quant int4 --device cuda & pids+=($!)
    for family in tiny-pg1 tiny-pg2; do
      python3 -m palionnx export "$work/$family" -o "$work/$family-fp16" --quant fp16
      python3 -m palionnx export "$work/$family" -o "$work/$family-int4" --quant int4 --device cuda
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    echo "prep done"
    ;;
  measure)
    source /tmp/gpu/kit/env.sh
    set -o pipefail
    python3 benchmarks/gpu_check.py --work "$work" --out "${OUT:-/tmp/gpu-out}" 2>&1 | tee "${OUT:-/tmp/gpu-out}/gpu_check.log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh prep|measure (see the comments at the top)" >&2
    exit 2
    ;;
esac

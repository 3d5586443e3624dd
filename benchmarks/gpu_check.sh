#!/usr/bin/env bash
# The CUDA check on a lent (offline) GPU machine, with ../shared/gpu bringing onnxruntime-gpu in four pieces.
#   here:        bash ../shared/gpu/pack.sh
#   run call 1:  carry [".gpu/c1"]:  bash .gpu/c1/start.sh 'bash benchmarks/gpu_check.sh prep'
#   run call 2:  carry [".gpu/c2"]:  bash benchmarks/gpu_check.sh piece 2
#   run call 3:  carry [".gpu/c3"]:  bash benchmarks/gpu_check.sh piece 3
#   run call 4:  carry [".gpu/c4"]:  bash benchmarks/gpu_check.sh piece 4 && bash benchmarks/gpu_check.sh measure
# A piece call copies .gpu/cN/part, and any trained checkpoints carried beside it (.gpu/cN/shapes-pg1, ...:
# copies of `palionnx synth shapes-pg1`, which would otherwise train again there; model.safetensors may be
# xz-packed to fit the transfer), into /tmp/gpu; the piece-2
# call then starts exporting the trained models (benchmarks/trained_quality.py --export-only), detached.
# prep (started detached by call 1, on the machine's CPUs while the pieces arrive) synthesises pg1-3b-224 and
# the tiny test models and exports them for CUDA (fp16, bf16, int4 at blocks 32 and 128). With HOST_CPU_CORES
# set (e.g. "14,15"), it also runs benchmarks/compare.py for the CPU (transformers fp32 and palionnx int4,
# exported and kernel-tuned on those cores only) on that slice of the host's CPU, with the image's CPU
# onnxruntime. measure waits for prep, runs benchmarks/gpu_check.py (every figure of the README's GPU table,
# parity, the float16-range check, the cache-length sweep), benchmarks/gpu_dtypes.py (float16 vs bfloat16
# products), benchmarks/trained_quality.py on CUDA when the trained models came, and, with
# STEP_KERNELS=1 where Nsight Compute runs, benchmarks/gpu_step_kernels.py; everything lands in $OUT.
set -euo pipefail
work=/tmp/gpu/work
gpu_cores=0-11
quality_levels=(fp32 fp16 bf16 int8:cuda int4:cuda)
case "${1:-}" in
  piece)
    cp ".gpu/c$2/part" "/tmp/gpu/part$2"
    mkdir -p /tmp/gpu/checkpoints
    for checkpoint in .gpu/c"$2"/shapes-*; do [ -d "$checkpoint" ] && cp -r "$checkpoint" /tmp/gpu/checkpoints/; done
    for packed in /tmp/gpu/checkpoints/*/*.xz; do [ -f "$packed" ] && xz -d "$packed"; done  # carried xz-packed
    if [ "$2" = 2 ] && [ -d /tmp/gpu/checkpoints/shapes-pg1 ] && [ -d /tmp/gpu/checkpoints/shapes-pg2 ]; then
      setsid nohup bash -c "export PYTHONPATH='$(pwd)/src' PYTHONUNBUFFERED=1; taskset -c 12,13 python3 \
        benchmarks/trained_quality.py --checkpoints /tmp/gpu/checkpoints --work /tmp/gpu/quality --export-only \
        --levels ${quality_levels[*]}; echo \$? > /tmp/gpu/quality.rc" > /tmp/gpu/quality.log 2>&1 < /dev/null &
      echo "trained-model exports started"
    fi
    ;;
  prep)
    mkdir -p "$work"
    python3 -m palionnx synth pg1-3b-224 -o "$work/pg1-3b-224" --dtype bfloat16
    if [ -n "${HOST_CPU_CORES:-}" ]; then
      mkdir -p /tmp/gpu/cpu && ln -sfn "$work/pg1-3b-224" /tmp/gpu/cpu/pg1-3b-224
      (set +e; taskset -c "$HOST_CPU_CORES" python3 benchmarks/compare.py --geometry pg1-3b-224 --levels int4 \
         --new-tokens 64 --images 1 --work /tmp/gpu/cpu --stem host-cpu-pg1-3b-224-64tok > /tmp/gpu/cpu.log 2>&1;
       echo $? > /tmp/gpu/cpu.rc) &
    fi
    for family in tiny-pg1 tiny-pg2; do python3 -m palionnx synth "$family" -o "$work/$family"; done
    python3 benchmarks/gpu_check.py --work "$work" --make-hot "$work/hot-pg2"
    export_for_cuda() { taskset -c "$gpu_cores" python3 -m palionnx export "$@"; }
    pids=()
    export_for_cuda "$work/pg1-3b-224" -o "$work/pg1-3b-224-fp16" --quant fp16 & pids+=($!)
    export_for_cuda "$work/pg1-3b-224" -o "$work/pg1-3b-224-bf16" --quant bf16 & pids+=($!)
    export_for_cuda "$work/pg1-3b-224" -o "$work/pg1-3b-224-int4" --quant int4 --device cuda & pids+=($!)
    export_for_cuda "$work/pg1-3b-224" -o "$work/pg1-3b-224-int4-b128" --quant int4 --device cuda --block-size 128 &
    pids+=($!)
    for family in tiny-pg1 tiny-pg2; do
      for level in fp32 fp16 bf16; do export_for_cuda "$work/$family" -o "$work/$family-$level" --quant "$level"; done
      export_for_cuda "$work/$family" -o "$work/$family-int4" --quant int4 --device cuda
    done
    for level in fp32 fp16 bf16; do export_for_cuda "$work/hot-pg2" -o "$work/hot-pg2-$level" --quant "$level"; done
    for pid in "${pids[@]}"; do wait "$pid"; done
    echo "prep done"
    ;;
  measure)
    started=$(date +%s)
    source /tmp/gpu/kit/env.sh
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    log="$out/all.log"
    set +e
    taskset -c "$gpu_cores" python3 benchmarks/gpu_check.py --work "$work" --out "$out" 2>&1 | tee -a "$log"
    taskset -c "$gpu_cores" timeout 150 python3 benchmarks/gpu_dtypes.py --out "$out" 2>&1 | tee -a "$log"
    if [ -f /tmp/gpu/quality.log ]; then
      while [ ! -f /tmp/gpu/quality.rc ] && [ $(($(date +%s) - started)) -lt 400 ]; do sleep 3; done
      tail -n 3 /tmp/gpu/quality.log | tee -a "$log"
      taskset -c "$gpu_cores" timeout 240 python3 benchmarks/trained_quality.py --device cuda --checkpoints \
        /tmp/gpu/checkpoints --work /tmp/gpu/quality --levels "${quality_levels[@]}" 2>&1 | tee -a "$log"
      cp benchmarks/results/trained-quality-cuda.json benchmarks/results/trained-quality-cuda.md "$out"/ 2>/dev/null
    fi
    ncu=$([ "${STEP_KERNELS:-0}" = 1 ] && { command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null; } || true)
    for level in fp16 int4; do
      [ -n "$ncu" ] || break
      csv="$out/kernels-$level.csv"
      taskset -c "$gpu_cores" timeout 120 "$ncu" --clock-control none --nvtx --nvtx-include "decode_step/" \
        --metrics gpu__time_duration.sum --print-units base --csv --log-file "$csv" \
        python3 benchmarks/gpu_step_kernels.py "$work/pg1-3b-224-$level" >> "$log" 2>&1
      echo "== decode-step kernels, $level" | tee -a "$log"
      python3 benchmarks/gpu_step_kernels.py --summarize "$csv" 2>&1 | tee -a "$log"
    done
    if [ -f /tmp/gpu/cpu.log ]; then  # wait for the CPU comparison, within this call's time
      while [ ! -f /tmp/gpu/cpu.rc ] && [ $(($(date +%s) - started)) -lt "${CPU_WAIT_UNTIL_S:-540}" ]; do sleep 5; done
      echo "== host CPU comparison (exit $(cat /tmp/gpu/cpu.rc 2>/dev/null || echo 'still running'))" | tee -a "$log"
      tail -n 30 /tmp/gpu/cpu.log | tee -a "$log"
      cp benchmarks/results/host-cpu-pg1-3b-224-64tok.json benchmarks/results/host-cpu-pg1-3b-224-64tok.md "$out"/ \
        2>/dev/null
    fi
    tail -n 40 /tmp/gpu/prep.log >> "$log"
    cat "$out/gpu_check.md"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh prep|measure (see the comments at the top)" >&2
    exit 2
    ;;
esac

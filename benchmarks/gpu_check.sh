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
# the tiny test models and exports them for CUDA (pg1-3b-224 at BIG_LEVELS, default "fp16 fp16-nk bf16
# bf16-nk int4", -nk: the linear weights in the [N, K] layout; each prep export adds about a minute to prep
# and a 3B folder about a minute to measure). With HOST_CPU_CORES set (e.g. "14,15"),
# it also runs benchmarks/compare.py for the CPU (transformers fp32 and palionnx int4, exported and
# kernel-tuned on those cores only) on that slice of the host's CPU, with the image's CPU onnxruntime.
# measure waits for prep, runs benchmarks/gpu_check.py (every figure of the README's GPU table, parity, the
# float16-range check, the cache-length sweep) and benchmarks/trained_quality.py on CUDA when the trained
# models came; everything lands in $OUT. Seen on an H200 (2026-11-26): prep ≈ 3 minutes, gpu_check ≈ 5 with
# three 3B folders (five since the -nk ones: expect ≈ 7), the trained models ≈ 1.5 per family, the host-CPU
# comparison ≈ 7 from prep's start: one measure call of at most 600 s holds gpu_check and one family
# (QUALITY_FAMILIES, default pg1; "none" on pieces 2 and measure skips them), so run the other in a second call:
#   bash benchmarks/gpu_check.sh quality pg2
# The decode-step profile (benchmarks/gpu_profile.py) instead of the full check: `profile-prep` in call 1 (it
# also exports each level with linear_layout "nk" and makes the graph variants' folders, on the CPU) and
# `profile` after piece 4 (the kit's env.sh waits for profile-prep). PROFILE_LEVELS picks the levels
# (default "fp16 bf16"; set it for both calls), PROFILE_PARTS the parts (default all); with QUALITY_FAMILIES=pg2
# set for piece 2 and profile, only that family's trained-model quality follows it. For example:
#   call 1: bash .gpu/c1/start.sh 'PROFILE_LEVELS=fp16 bash benchmarks/gpu_check.sh profile-prep'
#   call 4: bash benchmarks/gpu_check.sh piece 4 && PROFILE_LEVELS=fp16 PROFILE_PARTS="variants products" \
#             bash benchmarks/gpu_check.sh profile
set -euo pipefail
work=/tmp/gpu/work
gpu_cores=0-11
quality_levels=(fp32 fp16 bf16 int8:cuda int4:cuda)
profile_folders() { for level in ${PROFILE_LEVELS:-fp16 bf16}; do echo "pg1-3b-224-$level"; done; }
export_for_cuda() {  # SOURCE OUT QUANT [DEVICE [BLOCK [LINEAR_LAYOUT]]]
  taskset -c "$gpu_cores" python3 -c "import sys; from palionnx.export.convert import export
a = sys.argv[1:]; export(a[0], a[1], quant=a[2], device=a[3], block_size=int(a[4]) if a[4] else None, progress=print,
linear_layout=a[5])" "$1" "$2" "$3" "${4:-auto}" "${5:-}" "${6:-kn}"
}
case "${1:-}" in
  piece)
    cp ".gpu/c$2/part" "/tmp/gpu/part$2"
    mkdir -p /tmp/gpu/checkpoints
    for checkpoint in .gpu/c"$2"/shapes-*; do [ -d "$checkpoint" ] && cp -r "$checkpoint" /tmp/gpu/checkpoints/; done
    for packed in /tmp/gpu/checkpoints/*/*.xz; do [ -f "$packed" ] && xz -d "$packed"; done  # carried xz-packed
    families=${QUALITY_FAMILIES:-pg1 pg2} all_came=1
    for f in $families; do [ -d "/tmp/gpu/checkpoints/shapes-$f" ] || all_came=0; done
    if [ "$2" = 2 ] && [ "$all_came" = 1 ]; then
      setsid nohup bash -c "export PYTHONPATH='$(pwd)/src' PYTHONUNBUFFERED=1; taskset -c 12,13 python3 \
        benchmarks/trained_quality.py --checkpoints /tmp/gpu/checkpoints --work /tmp/gpu/quality --export-only \
        --families $families --levels ${quality_levels[*]}; echo \$? > /tmp/gpu/quality.rc" \
        > /tmp/gpu/quality.log 2>&1 < /dev/null &
      echo "trained-model exports started"
    fi
    ;;
  prep)
    mkdir -p "$work"
    # the library, not the CLI: the GPU image's typer may differ from the one the CLI is written for
    synth() { python3 -c "import sys; from palionnx.testmodels.synth import write_checkpoint as w; w(*sys.argv[1:3], dtype=sys.argv[3])" "$@"; }
    synth pg1-3b-224 "$work/pg1-3b-224" bfloat16
    if [ -n "${HOST_CPU_CORES:-}" ]; then
      mkdir -p /tmp/gpu/cpu && ln -sfn "$work/pg1-3b-224" /tmp/gpu/cpu/pg1-3b-224
      (set +e; taskset -c "$HOST_CPU_CORES" python3 benchmarks/compare.py --geometry pg1-3b-224 --levels int4 \
         --new-tokens 64 --images 1 --work /tmp/gpu/cpu --stem host-cpu-pg1-3b-224-64tok > /tmp/gpu/cpu.log 2>&1;
       echo $? > /tmp/gpu/cpu.rc) &
    fi
    for family in tiny-pg1 tiny-pg2; do synth "$family" "$work/$family" float32; done
    python3 benchmarks/gpu_check.py --work "$work" --make-hot "$work/hot-pg2"
    pids=()
    for level in ${BIG_LEVELS:-fp16 fp16-nk bf16 bf16-nk int4}; do  # -nk: linear weights [N, K], FusedMatMul transB=1
      quant=${level%-nk} layout=kn
      [ "$level" = "$quant" ] || layout=nk
      export_for_cuda "$work/pg1-3b-224" "$work/pg1-3b-224-$level" "$quant" cuda "" "$layout" & pids+=($!)
    done
    for family in tiny-pg1 tiny-pg2; do
      for level in fp32 fp16 bf16; do export_for_cuda "$work/$family" "$work/$family-$level" "$level"; done
      export_for_cuda "$work/$family" "$work/$family-int4" int4 cuda
      export_for_cuda "$work/$family" "$work/$family-fp16-nk" fp16 auto "" nk
    done
    for level in fp32 fp16 bf16; do export_for_cuda "$work/hot-pg2" "$work/hot-pg2-$level" "$level"; done
    for pid in "${pids[@]}"; do wait "$pid"; done
    echo "prep done"
    ;;
  profile-prep)  # pg1-3b-224 at PROFILE_LEVELS (default fp16 bf16), in both linear layouts, and their variants
    mkdir -p "$work"
    python3 -c "import sys; from palionnx.testmodels.synth import write_checkpoint as w; w(*sys.argv[1:3], dtype='bfloat16')" \
      pg1-3b-224 "$work/pg1-3b-224"
    for level in ${PROFILE_LEVELS:-fp16 bf16}; do
      export_for_cuda "$work/pg1-3b-224" "$work/pg1-3b-224-$level" "$level" &
      export_for_cuda "$work/pg1-3b-224" "$work/pg1-3b-224-$level-nk" "$level" auto "" nk &
    done
    wait
    python3 benchmarks/gpu_profile.py --work "$work" --folders $(profile_folders) --parts prepare --jobs 2  # 2 x 12 GB of the host's memory
    echo "prep done"
    ;;
  profile)  # after profile-prep: benchmarks/gpu_profile.py, then the trained models' quality if they came
    source /tmp/gpu/kit/env.sh
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    set +e
    taskset -c "$gpu_cores" python3 benchmarks/gpu_profile.py --work "$work" --out "$out" --folders $(profile_folders) \
      --parts ${PROFILE_PARTS:-settings products variants} 2>&1 | tee -a "$out/all.log"
    [ -f /tmp/gpu/quality.log ] && bash "$0" quality ${QUALITY_FAMILIES:-pg1 pg2} 2>&1 | tee -a "$out/all.log"
    tail -n 20 /tmp/gpu/prep.log /tmp/gpu/quality.log >> "$out/all.log" 2>/dev/null
    ;;
  measure)
    started=$(date +%s)
    source /tmp/gpu/kit/env.sh
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    log="$out/all.log"
    set +e
    taskset -c "$gpu_cores" python3 benchmarks/gpu_check.py --work "$work" --out "$out" 2>&1 | tee -a "$log"
    [ -f /tmp/gpu/quality.log ] && bash "$0" quality ${QUALITY_FAMILIES:-pg1} 2>&1 | tee -a "$log"
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
  quality)  # FAMILY...: the trained models' quality table on CUDA (after the piece-2 exports)
    shift
    source /tmp/gpu/kit/env.sh > /dev/null
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    while [ ! -f /tmp/gpu/quality.rc ]; do sleep 3; done
    taskset -c "$gpu_cores" python3 benchmarks/trained_quality.py --device cuda --checkpoints /tmp/gpu/checkpoints \
      --work /tmp/gpu/quality --families "$@" --levels "${quality_levels[@]}" --name "trained-quality-cuda-$*"
    cp benchmarks/results/trained-quality-cuda-"$*".* "$out"/
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh piece N|prep|measure|quality FAMILY...|profile-prep|profile" \
      "(see the comments at the top)" >&2
    exit 2
    ;;
esac

"""The CUDA check for a lent GPU machine: every figure of the fused decoder's target table, in one run.

    python benchmarks/gpu_check.py --work DIR [--out DIR] [--device cuda]

Expects in DIR what `benchmarks/gpu_check.sh prep` made: `pg1-3b-224-{fp16,int4,bf16,fp16-nk,bf16-nk}` (built
for CUDA; -nk: the linear weights [N, K] for FusedMatMul transB=1), `tiny-{pg1,pg2}-{fp32,fp16,int4,bf16,fp16-nk}`
and `hot-pg2-{fp32,fp16,bf16}` folders. Prints and writes (JSON + Markdown under --out):

1. parity: greedy tokens of the tiny models on CUDA against the same folder on the CPU (bf16, which the
   CPU cannot run: against the fp32 folder), batch 1 and 4, and with the CUDA graph on against off;
2. range: a Gemma 2 checkpoint whose residual stream outgrows float16 (`hot-pg2`), fp16 and bf16 on CUDA
   against fp32 on the CPU;
3. placement: the bf16 decoder's nodes per execution provider in a decode step (onnxruntime's profiler);
4. pg1-3b-224, 260-token prompt, 64 new tokens (eos ignored): vision, prefill, decode ms/token at batch 1,
   the first 64 decode steps with room for 64 and for 1024 new tokens, images/s at batch 8/16/32/64, GPU
   memory; and the cache-length sweep: batch-1 decode (first 64 steps, and through the caption loop) and
   batch-8 decode with the KV cache at least 0 / 1024 / 4096 slots (`OnnxPaliGemma.min_cache_slots`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from palionnx import Captioner
from palionnx.runtime.contract import DECODER
from palionnx.runtime.measure import decode_step_ms, device_name
from palionnx.samples import sample_images
from palionnx.system import process_gpu_memory_mb

PROMPTS = ["caption en", "describe this picture in great detail", "caption en", "x"]
# measured in this order (a run cut short keeps the first); -nk: linear weights [N, K], FusedMatMul transB=1
BIG = ("pg1-3b-224-fp16", "pg1-3b-224-fp16-nk", "pg1-3b-224-bf16", "pg1-3b-224-bf16-nk", "pg1-3b-224-int4")
CACHE_FLOORS = (0, 1024, 4096)


def parity(work: Path, device: str) -> list[dict[str, Any]]:
    """Greedy tokens on `device` (graph on and off) against the CPU, tiny models, batch 1 and 4."""
    rows = []
    images = sample_images(4)
    levels = ("fp16", "fp16-nk", "int4", "bf16")
    for name in [f"tiny-{family}-{level}" for family in ("pg1", "pg2") for level in levels]:
        folder = work / name
        reference = work / name.replace("bf16", "fp32")  # the CPU cannot run bf16: compare with fp32
        runs, logits = {}, {}
        for label, path, kwargs in (("cpu", reference, dict(device="cpu")), ("graph", folder, dict(device=device)),
                                    ("plain", folder, dict(device=device, cuda_graph=False))):
            captioner = Captioner.load(path, **kwargs)
            logits[label] = captioner.prefill_logits(images, PROMPTS)
            batch4 = captioner.caption(images, prompt=PROMPTS, max_new_tokens=24, batch_size=4)
            batch1 = captioner.caption(images, prompt=PROMPTS, max_new_tokens=24, batch_size=1)
            runs[label] = [r.tokens for r in batch4] + [r.tokens for r in batch1]
        rows.append({"model": name, "sequences": len(runs["cpu"]),
                     "prefill_logit_diff": float(np.abs(logits["graph"] - logits["cpu"]).max()),
                     "logit_scale": float(np.abs(logits["cpu"]).max()),
                     "cuda_equals_cpu": sum(a == b for a, b in zip(runs["graph"], runs["cpu"])),
                     "graph_equals_plain": sum(a == b for a, b in zip(runs["graph"], runs["plain"]))})
        print(rows[-1], flush=True)
    return rows


def overflow_check(work: Path, device: str) -> list[dict[str, Any]]:
    """`hot-pg2` (a Gemma 2 whose residual stream outgrows float16) at fp16 and bf16 on `device` against fp32
    on the CPU: prefill logits finite, their largest difference, the same next token."""
    images = sample_images(4)
    reference = Captioner.load(work / "hot-pg2-fp32", device="cpu").prefill_logits(images, PROMPTS)
    rows = []
    for level in ("fp16", "bf16"):
        logits = Captioner.load(work / f"hot-pg2-{level}", device=device).prefill_logits(images, PROMPTS)
        rows.append({"model": f"hot-pg2-{level}", "finite": bool(np.isfinite(logits).all()),
                     "max_logit_diff": float(np.abs(logits - reference).max()),
                     "logit_scale": float(np.abs(reference).max()),
                     "same_next_token": int((logits.argmax(-1) == reference.argmax(-1)).sum())})
        print(rows[-1], flush=True)
    return rows


def make_hot_checkpoint(target: Path) -> None:
    """tiny-pg2 with its post-feedforward norms scaled so that the residual stream outgrows float16 (what
    tests/test_export.py's overflow test builds)."""
    import torch
    from safetensors.torch import load_file, save_file

    from palionnx.testmodels.synth import write_checkpoint

    checkpoint = write_checkpoint("tiny-pg2", target, seed=3)
    weights = load_file(checkpoint / "model.safetensors")
    for name in weights:
        if "post_feedforward_layernorm" in name:
            weights[name] = torch.full_like(weights[name], 4.0e4)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})


def placement(folder: Path, device: str) -> dict[str, Any]:
    """Count a decode step's nodes per provider with onnxruntime's profiler (a plain, uncaptured session)."""
    captioner = Captioner.load(folder, device=device, cuda_graph=False)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/{folder.name}-profile"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    captioner.model.decoder = ort.InferenceSession(str(folder / captioner.manifest.graphs[DECODER].file), options,
                                                   providers=providers)
    captioner.caption(sample_images(1, size=captioner.manifest.image_size), max_new_tokens=4, ignore_eos=True)
    profile = Path(captioner.model.decoder.end_profiling())
    counts: collections.Counter = collections.Counter()
    micros: collections.Counter = collections.Counter()
    for event in json.loads(profile.read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            counts[(args["op_name"], args["provider"])] += 1
            micros[args["op_name"]] += event.get("dur", 0)
    on_cpu = sorted({op for (op, provider) in counts if provider == "CPUExecutionProvider"})
    total = sum(micros.values()) or 1
    result = {"model": folder.name, "providers": dict(collections.Counter(p for (_, p) in counts.elements())),
              "ops_on_cpu": on_cpu,
              "time_share": {op: round(us / total, 3) for op, us in micros.most_common(8)}}
    print(result, flush=True)
    return result


def timed_caption(captioner: Captioner, images: list, batch: int, tokens: int) -> tuple[float, Any]:
    started = time.perf_counter()
    results = captioner.caption(images, max_new_tokens=tokens, batch_size=batch, ignore_eos=True)
    return time.perf_counter() - started, results


def phases(captioner: Captioner, tokens: int, repeats: int = 3) -> dict[str, float]:
    """Batch 1: vision (+ prompt layout) ms, prefill ms, decode ms/token; median of `repeats` after a warm-up."""
    image = sample_images(1, size=captioner.manifest.image_size)
    timed_caption(captioner, image, 1, tokens)
    runs = [timed_caption(captioner, image, 1, tokens)[1][0].timings for _ in range(repeats)]
    return {"vision_ms": 1000 * float(np.median([t.vision_s for t in runs])),
            "prefill_ms": 1000 * float(np.median([t.prefill_s for t in runs])),
            "decode_ms_per_token": float(np.median([t.decode_ms_per_token for t in runs]))}


def throughput(captioner: Captioner, batch: int, tokens: int) -> float:
    """images/s over two full batches of `batch` images after a warm-up batch."""
    images = sample_images(2 * batch, size=captioner.manifest.image_size)
    timed_caption(captioner, images[:batch], batch, tokens)
    seconds, _ = timed_caption(captioner, images, batch, tokens)
    return 2 * batch / seconds


def batch_decode_ms(captioner: Captioner, batch: int, tokens: int = 64) -> float:
    """Decode ms per step at `batch` rows through the caption loop (after a warm-up batch)."""
    images = sample_images(batch, size=captioner.manifest.image_size)
    timed_caption(captioner, images, batch, tokens)
    return timed_caption(captioner, images, batch, tokens)[1][0].timings.decode_ms_per_token


def cache_floor_sweep(captioner: Captioner) -> list[dict[str, float]]:
    """Decode with the KV cache at least `floor` slots long, for each of CACHE_FLOORS."""
    default, rows = captioner.model.min_cache_slots, []
    for floor in CACHE_FLOORS:
        captioner.model.min_cache_slots = floor
        rows.append({"min_cache_slots": floor, "step_ms_b1": decode_step_ms(captioner, 64),
                     "loop_ms_b1": phases(captioner, 64)["decode_ms_per_token"],
                     "loop_ms_b8": batch_decode_ms(captioner, 8)})
        print(captioner.folder.name, rows[-1], flush=True)
    captioner.model.min_cache_slots = default
    return rows


def bench(folder: Path, device: str, batches: list[int]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": folder.name}
    started = time.perf_counter()
    captioner = Captioner.load(folder, device=device)
    row["load_s"] = time.perf_counter() - started
    row.update(phases(captioner, 64))
    row["decode_ms_first64_of_64"] = decode_step_ms(captioner, 64)
    row["decode_ms_first64_of_1024"] = decode_step_ms(captioner, 1024)
    row["min_cache_slots"] = captioner.model.min_cache_slots
    row["cache_floor_sweep"] = cache_floor_sweep(captioner)
    for batch in batches:
        row[f"images_per_s_b{batch}"] = throughput(captioner, batch, 64)
        print(folder.name, f"batch {batch}: {row[f'images_per_s_b{batch}']:.1f} images/s", flush=True)
    row["gpu_memory_mb"] = process_gpu_memory_mb()
    print(row, flush=True)
    return row


def in_subprocess(folder: Path, device: str, batches: list[int]) -> dict[str, Any]:
    """`bench` in a fresh process, so the GPU memory it reports is this folder's alone."""
    out = subprocess.run([sys.executable, __file__, "--bench-one", str(folder), "--device", device, "--batches",
                          *map(str, batches), "--work", str(folder.parent)], capture_output=True, text=True)
    print(out.stdout, out.stderr[-2000:] if out.returncode else "", flush=True)
    if out.returncode:
        return {"model": folder.name, "error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['gpu']}, onnxruntime {report['onnxruntime']}. `pg1-3b-224` random weights, 260-token prompt, "
             "64 new tokens (eos ignored), decode batch 1 unless stated.", "",
             "| level | vision ms | prefill ms | decode ms/tok | first 64 of 64 / of 1024 | "
             "images/s b8 | b16 | b32 | b64 | GPU MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    measured = [row for row in report["bench"] if "error" not in row]
    for row in measured:
        cells = [row.get(f"images_per_s_b{b}") for b in (8, 16, 32, 64)]
        lines.append(f"| {row['model']} | {row['vision_ms']:.1f} | {row['prefill_ms']:.1f} | "
                     f"{row['decode_ms_per_token']:.2f} | "
                     f"{row['decode_ms_first64_of_64']:.2f} / {row['decode_ms_first64_of_1024']:.2f} | "
                     + " | ".join("—" if c is None else f"{c:.1f}" for c in cells)
                     + f" | {row['gpu_memory_mb'] or 0:.0f} |")
    lines += ["", "Decode ms/step with the KV cache at least N slots (batch 1: first 64 steps / through the caption "
              "loop; batch 8: through the loop):", "",
              "| level | " + " | ".join(f"N = {floor}" for floor in CACHE_FLOORS) + " |",
              "| --- |" + " ---: |" * len(CACHE_FLOORS)]
    for row in measured:
        cells = [f"{r['step_ms_b1']:.2f} / {r['loop_ms_b1']:.2f}; b8 {r['loop_ms_b8']:.2f}"
                 for r in row["cache_floor_sweep"]]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += ["", "Parity, tiny models, greedy, 24 tokens, batch 4 and batch 1 (8 sequences): the same tokens as the "
              "reference (the folder on the CPU; for bf16 the fp32 folder), and CUDA graph on = off:", "",
              "| model | = reference | graph = plain | max prefill logit diff (scale) |",
              "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['cuda_equals_cpu']}/{r['sequences']} | "
              f"{r['graph_equals_plain']}/{r['sequences']} | {r['prefill_logit_diff']:.3f} ({r['logit_scale']:.1f}) |"
              for r in report.get("parity", [])]
    lines += ["", "A Gemma 2 whose residual stream outgrows float16 (`hot-pg2`) against fp32 on the CPU:", "",
              "| model | finite | max logit diff (scale) | same next token |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['finite']} | {r['max_logit_diff']:.3f} ({r['logit_scale']:.1f}) | "
              f"{r['same_next_token']}/4 |" for r in report.get("overflow", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-out")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--bench-one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-hot", type=Path, help="write the hot-pg2 checkpoint here and exit")
    args = parser.parse_args()
    if args.make_hot:
        make_hot_checkpoint(args.make_hot)
        return
    if args.bench_one:
        print(json.dumps(bench(args.bench_one, args.device, args.batches)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = device_name(args.device)
    report: dict[str, Any] = {"gpu": gpu, "onnxruntime": ort.__version__}
    save = lambda: (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")  # noqa: E731
    report["parity"] = parity(args.work, args.device)
    report["overflow"] = overflow_check(args.work, args.device)
    save()
    big = [args.work / name for name in BIG if (args.work / name).is_dir()]
    report["placement"] = [placement(args.work / "pg1-3b-224-bf16", args.device)]
    report["bench"] = []
    for folder in big:  # saved after each folder: a run cut short keeps what it measured
        report["bench"].append(in_subprocess(folder, args.device, args.batches))
        save()
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""The CUDA check for a lent GPU machine: every figure of the fused decoder's target table, in one run.

    python benchmarks/gpu_check.py --work DIR [--out DIR] [--device cuda]

Expects in DIR what `benchmarks/gpu_check.sh prep` made: `pg1-3b-224-fp16`, `pg1-3b-224-int4` (built for
CUDA) and `tiny-{pg1,pg2}-{fp16,int4}` folders. Prints and writes (JSON + Markdown under --out):

1. parity: greedy tokens of the tiny models on CUDA against the same folder on the CPU (batch 1 and 4),
   and with the CUDA graph on against off;
2. placement: the decoder's nodes per execution provider in a decode step (onnxruntime's profiler);
3. pg1-3b-224, 260-token prompt, 64 new tokens (eos ignored): vision, prefill, decode ms/token at batch 1
   with the CUDA graph on and off, the first 64 decode steps with room for 64 and for 1024 new tokens,
   images/s at batch 8/16/32/64, GPU memory.
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
from palionnx.runtime.measure import decode_step_ms, gpu_memory_mb
from palionnx.samples import sample_images

PROMPTS = ["caption en", "describe this picture in great detail", "caption en", "x"]


def parity(work: Path, device: str) -> list[dict[str, Any]]:
    """Greedy tokens on `device` (graph on and off) against the CPU, tiny models, batch 1 and 4."""
    rows = []
    images = sample_images(4)
    for name in ("tiny-pg1-fp16", "tiny-pg1-int4", "tiny-pg2-fp16", "tiny-pg2-int4"):
        folder = work / name
        runs, logits = {}, {}
        for label, kwargs in (("cpu", dict(device="cpu")), ("graph", dict(device=device)),
                              ("plain", dict(device=device, cuda_graph=False))):
            captioner = Captioner.load(folder, **kwargs)
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


def bench(folder: Path, device: str, batches: list[int]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": folder.name}
    started = time.perf_counter()
    captioner = Captioner.load(folder, device=device)
    row["load_s"] = time.perf_counter() - started
    row.update(phases(captioner, 64))
    row["decode_ms_first64_of_64"] = decode_step_ms(captioner, 64)
    row["decode_ms_first64_of_1024"] = decode_step_ms(captioner, 1024)
    for batch in batches:
        row[f"images_per_s_b{batch}"] = throughput(captioner, batch, 64)
        print(folder.name, f"batch {batch}: {row[f'images_per_s_b{batch}']:.1f} images/s", flush=True)
    row["gpu_memory_mb"] = gpu_memory_mb()
    plain = Captioner.load(folder, device=device, cuda_graph=False)
    row["decode_ms_per_token_no_graph"] = phases(plain, 64)["decode_ms_per_token"]
    print(row, flush=True)
    return row


def in_subprocess(folder: Path, device: str, batches: list[int]) -> dict[str, Any]:
    """`bench` in a fresh process, so the GPU memory it reports is this folder's alone."""
    out = subprocess.run([sys.executable, __file__, "--bench-one", str(folder), "--device", device, "--batches",
                          *map(str, batches), "--work", str(folder.parent)], capture_output=True, text=True)
    print(out.stdout, out.stderr[-2000:] if out.returncode else "", flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['gpu']}, onnxruntime {report['onnxruntime']}. `pg1-3b-224` random weights, 260-token prompt, "
             "64 new tokens (eos ignored), decode batch 1 unless stated.", "",
             "| level | vision ms | prefill ms | decode ms/tok | no CUDA graph | first 64 of 64 / of 1024 | "
             "images/s b8 | b16 | b32 | b64 | GPU MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["bench"]:
        cells = [row.get(f"images_per_s_b{b}") for b in (8, 16, 32, 64)]
        lines.append(f"| {row['model']} | {row['vision_ms']:.1f} | {row['prefill_ms']:.1f} | "
                     f"{row['decode_ms_per_token']:.2f} | {row['decode_ms_per_token_no_graph']:.2f} | "
                     f"{row['decode_ms_first64_of_64']:.2f} / {row['decode_ms_first64_of_1024']:.2f} | "
                     + " | ".join("—" if c is None else f"{c:.1f}" for c in cells)
                     + f" | {row['gpu_memory_mb'] or 0:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-out")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--bench-one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bench_one:
        print(json.dumps(bench(args.bench_one, args.device, args.batches)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if args.device == "cuda" else "CPU"
    report: dict[str, Any] = {"gpu": gpu, "onnxruntime": ort.__version__}
    report["parity"] = parity(args.work, args.device)
    big = [args.work / name for name in ("pg1-3b-224-fp16", "pg1-3b-224-int4") if (args.work / name).is_dir()]
    report["placement"] = [placement(folder, args.device) for folder in big or [args.work / "tiny-pg1-int4"]]
    report["bench"] = [in_subprocess(folder, args.device, args.batches) for folder in big]
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

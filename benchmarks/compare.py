"""palionnx against transformers (PyTorch eager), per quant level, on one synthetic checkpoint.

    python benchmarks/compare.py --geometry pg1-3b-224 --new-tokens 64 --levels fp32 int8 int4

In one run on one machine: transformers `generate()` fp32 on CPU (the origin script's path), then each
palionnx level, with the same images, prompt and fixed generated length (eos ignored). Each row gives
vision ms/image, prefill ms, decode ms/token, seconds per image end to end, images/s, peak RSS and size on
disk; palionnx rows also as a speed-up over transformers fp32, and decode ms/token as a multiple of the
decode floor (weight bytes read per step / memory bandwidth measured here by a copy benchmark).
Writes JSON and a Markdown table to benchmarks/results/.
Each measurement runs in its own subprocess so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from palionnx.runtime.defaults import DEFAULT_PROMPT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def copy_bandwidth_gbs(megabytes: int = 2048, repeats: int = 5) -> float:
    """Memory bandwidth from a large copy on every core at once (numpy releases the GIL while copying):
    bytes read + written per second, best of `repeats`. One thread alone does not saturate memory."""
    from concurrent.futures import ThreadPoolExecutor

    threads = len(os.sched_getaffinity(0))
    sources = [np.ones(megabytes * 2**20 // 8 // threads, dtype=np.float64) for _ in range(threads)]
    targets = [np.empty_like(source) for source in sources]
    with ThreadPoolExecutor(threads) as pool:
        def copy_all() -> None:
            list(pool.map(np.copyto, targets, sources))

        best = min(_timed(copy_all) for _ in range(repeats))
    return 2 * sum(source.nbytes for source in sources) / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def decoder_weight_bytes(folder: Path) -> int:
    """Bytes a decode step reads: the weights the decoder graph uses (all layers and the lm_head), not the
    other graphs' that share its weights file (a decoder_prefill graph's int8 layers)."""
    import onnx
    from onnx import external_data_helper

    from palionnx.runtime.contract import DECODER, GRAPH_FILES

    graph = onnx.load(str(folder / GRAPH_FILES[DECODER]), load_external_data=False).graph
    total = 0
    for tensor in graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            total += int({e.key: e.value for e in tensor.external_data}["length"])
        else:
            total += len(tensor.raw_data)
    return total


def load_transformers(checkpoint: Path, images: int) -> tuple[Any, Any, list[Any]]:
    """The origin script's setup: transformers fp32, eager attention, all cores; plus the test images."""
    import torch

    from palionnx.export.validate import load_reference
    from palionnx.samples import sample_images

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, processor = load_reference(checkpoint)
    return model, processor, sample_images(images, size=model.config.vision_config.image_size)


def measure_transformers(checkpoint: Path, images: int, new_tokens: int) -> dict:
    """Phases of transformers generate() in fp32 eager on CPU: vision, prefill, decode per token."""
    import torch

    from palionnx.runtime.measure import peak_rss_mb

    started = time.perf_counter()
    model, processor, pictures = load_transformers(checkpoint, images)
    load_s = time.perf_counter() - started
    rows = []
    with torch.no_grad():
        warm = processor(images=pictures[0], text="<image>" + DEFAULT_PROMPT, return_tensors="pt")
        model.generate(**warm, max_new_tokens=2, do_sample=False)  # warm-up, excluded
        for picture in pictures:
            inputs = processor(images=picture, text="<image>" + DEFAULT_PROMPT, return_tensors="pt")
            vision = _timed(partial(model.get_image_features, inputs["pixel_values"]))
            first = _timed(partial(model, **inputs, use_cache=True))  # vision + prefill
            total = _timed(partial(model.generate, **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False))
            rows.append((vision, first - vision, (total - first) / (new_tokens - 1), total))
    vision, prefill, decode, total = (float(np.median(column)) for column in zip(*rows))
    return {
        "engine": "transformers", "level": "fp32", "load_s": load_s, "vision_ms_per_image": 1000 * vision,
        "prefill_ms": 1000 * prefill, "decode_ms_per_token": 1000 * decode, "seconds_per_image": total,
        "images_per_s": 1 / total, "peak_rss_mb": peak_rss_mb(),
        "size_on_disk_mb": sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6,
    }


def measure_transformers_batch(checkpoint: Path, images: int, new_tokens: int) -> dict:
    """transformers generate() on `images` images in one batch (warm-up excluded): images per second."""
    import torch

    model, processor, pictures = load_transformers(checkpoint, images)
    inputs = processor(images=pictures, text=["<image>" + DEFAULT_PROMPT] * images, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up, excluded
        total = _timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False))
    return {"images_per_s": images / total}


def measure_palionnx(folder: Path, images: int, new_tokens: int, batch_size: int) -> dict:
    from palionnx.runtime.measure import measure

    row = measure(folder, images=images, max_new_tokens=new_tokens, batch_size=batch_size, device="cpu", repeats=1)
    row.update(engine="palionnx", level=row["quant"], seconds_per_image=1 / row["images_per_s"])
    return row


def in_subprocess(kind: str, *args: Any) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps([kind, *map(str, args)])],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(geometry: str, levels: list[str], work: Path) -> tuple[Path, dict[str, Path]]:
    """Synthesize the checkpoint and export each level, reusing what `work` already holds. A level is
    LEVEL[:KERNELS[:BLOCK]]: int4 (CPU kernels measured at export), int4:nbits:32 (MatMulNBits at block
    32 everywhere: the formulation before kernels were measured), int4:qgemm:128, ..."""
    from palionnx.export.convert import export
    from palionnx.runtime.contract import MANIFEST_NAME
    from palionnx.testmodels.synth import write_checkpoint

    checkpoint = work / geometry
    if not (checkpoint / "config.json").exists():
        write_checkpoint(geometry, checkpoint)
    folders = {}
    for spec in levels:
        level, kernels, block = _parse_level(spec)
        folders[spec] = work / f"{geometry}-{spec.replace(':', '-')}"
        if not (folders[spec] / MANIFEST_NAME).exists():
            export(checkpoint, folders[spec], quant=level, progress=print, kernels=kernels,
                   block_size=int(block) if block else None, device="cpu" if level != "fp16" else "auto")
    return checkpoint, folders


def markdown(rows: list[dict], floor_ms: dict[str, float], machine: str, args: argparse.Namespace) -> str:
    lines = [
        f"`{args.geometry}`, {args.new_tokens} new tokens (eos ignored), batch {args.batch_size}, "
        f"{args.images} images, prompt `{DEFAULT_PROMPT}`. Machine: {machine}.",
        "",
        "| engine | level | kernels (vision / prefill / decode) | vision ms/img | prefill ms | decode ms/tok | "
        "s/image | images/s | images/s batch 8 | speed-up vs transformers fp32 | decode / floor | peak RSS MB | "
        "disk MB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = rows[0]["seconds_per_image"]
    for row in rows:
        floor = floor_ms.get(row["level"]) if row["engine"] == "palionnx" else None
        batch8 = row.get("images_per_s_batch8")
        batch8_cell = f"{batch8:.3f}" if batch8 else "—"
        floor_cell = f"{row['decode_ms_per_token'] / floor:.2f}" if floor else "—"
        kernels = row.get("cpu_kernels") or {}
        kernels_cell = " / ".join(kernels[k] for k in ("vision", "prefill", "decode")) if kernels else "—"
        lines.append(
            f"| {row['engine']} | {row['level']} | {kernels_cell} | {row['vision_ms_per_image']:.0f} | "
            f"{row['prefill_ms']:.0f} | "
            f"{row['decode_ms_per_token']:.1f} | {row['seconds_per_image']:.1f} | {row['images_per_s']:.3f} | "
            f"{batch8_cell} | {base / row['seconds_per_image']:.2f}x | {floor_cell} | "
            f"{row['peak_rss_mb']:.0f} | {row['size_on_disk_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def render(path: Path) -> None:
    """Recompute floors from a fresh bandwidth measurement and rewrite the JSON and Markdown beside it."""
    report = json.loads(path.read_text())
    old, bandwidth = report["bandwidth_gbs"], copy_bandwidth_gbs()
    report["floor_ms"] = {level: ms * old / bandwidth for level, ms in report["floor_ms"].items()}
    report["bandwidth_gbs"] = bandwidth
    report["machine"] = f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, copy bandwidth {bandwidth:.1f} GB/s"
    path.write_text(json.dumps(report, indent=2) + "\n")
    args = argparse.Namespace(**report["args"])
    table = markdown(report["rows"], report["floor_ms"], report["machine"], args)
    path.with_suffix(".md").write_text(table)
    print(table)


def _parse_level(spec: str) -> tuple[str, str, str]:
    """LEVEL[:KERNELS[:BLOCK]] -> (level, kernels or "auto", block or "")."""
    parts = spec.split(":")
    return parts[0], parts[1] if len(parts) > 1 else "auto", parts[2] if len(parts) > 2 else ""


def measure_round(args: argparse.Namespace, checkpoint: Path, folders: dict[str, Path],
                  floor_ms: dict[str, float]) -> list[dict]:
    """One measurement of transformers (unless skipped) and of every palionnx folder, each in its own process."""
    rows = [] if args.skip_transformers else [in_subprocess("transformers", checkpoint, args.images, args.new_tokens)]
    if rows and args.batch8:
        rows[0]["images_per_s_batch8"] = in_subprocess("transformers-batch", checkpoint, 8, args.new_tokens)[
            "images_per_s"]
    for level, folder in folders.items():
        rows.append(in_subprocess("palionnx", folder, args.images, args.new_tokens, args.batch_size))
        rows[-1]["level"] = level
        if args.batch8:
            rows[-1]["images_per_s_batch8"] = in_subprocess("palionnx", folder, 8, args.new_tokens, 8)["images_per_s"]
        print(f"{level}: {rows[-1]['decode_ms_per_token']:.1f} ms/token (floor {floor_ms[level]:.1f})", flush=True)
    return rows


def _best_rows(best: list[dict], new: list[dict]) -> list[dict]:
    """Per engine and level, the row of the round with the fewest seconds per image (other work on a shared
    machine only ever slows a run down)."""
    if not best:
        return new
    return [min(old, row, key=lambda r: r["seconds_per_image"]) for old, row in zip(best, new)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="pg1-3b-224-l4")
    parser.add_argument("--levels", nargs="+", default=["fp32", "int8", "int4"],
                        help="LEVEL[:KERNELS[:BLOCK]], e.g. int4 (kernels measured at export), int4:nbits:32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/palionnx-bench"))
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--stem", help="results file name (default GEOMETRY-Ntok-bB)")
    parser.add_argument("--rounds", type=int, default=1, help="measure everything this many times, keep the best")
    parser.add_argument("--batch8", action="store_true", help="also measure palionnx images/s on 8 images at batch 8")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, help="re-render a results JSON with a fresh bandwidth measurement")
    args = parser.parse_args()
    if args.measure:
        kind, *rest = json.loads(args.measure)
        if kind == "transformers":
            print(json.dumps(measure_transformers(Path(rest[0]), int(rest[1]), int(rest[2]))))
        elif kind == "transformers-batch":
            print(json.dumps(measure_transformers_batch(Path(rest[0]), int(rest[1]), int(rest[2]))))
        else:
            print(json.dumps(measure_palionnx(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))))
        return

    if args.render:
        render(args.render)
        return
    checkpoint, folders = prepare(args.geometry, args.levels, args.work)
    bandwidth = copy_bandwidth_gbs()
    floor_ms = {level: decoder_weight_bytes(folder) / (bandwidth * 1e9) * 1000 for level, folder in folders.items()}
    rows: list[dict] = []
    for _ in range(args.rounds):  # each engine once per round; the fastest round of each is kept
        rows = _best_rows(rows, measure_round(args, checkpoint, folders, floor_ms))
    if copy_bandwidth_gbs() > bandwidth:  # the copy, like the rest, is only ever slowed by other work
        bandwidth = copy_bandwidth_gbs()
        floor_ms = {level: decoder_weight_bytes(f) / (bandwidth * 1e9) * 1000 for level, f in folders.items()}
    machine = f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, copy bandwidth {bandwidth:.1f} GB/s"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"{args.geometry}-{args.new_tokens}tok-b{args.batch_size}"
    report = {"machine": machine, "bandwidth_gbs": bandwidth, "floor_ms": floor_ms, "rows": rows, "args": vars(args)}
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if rows and not args.skip_transformers:
        table = markdown(rows, floor_ms, machine, args)
        (RESULTS / f"{stem}.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()

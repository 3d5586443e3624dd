"""Throughput per batch size on the CPU: images/s at a fixed caption length (eos ignored), folder against folder.

    python benchmarks/cpu_batch.py big/pg1-int4 big/pg1-int4-before=../before/src --batches 1 8 16 32

A folder given as FOLDER=SRC runs with the palionnx package in SRC (PYTHONPATH), e.g. a checkout of an
earlier commit, so that a folder and the code that made it are measured against today's in one run.
Each (folder, batch) pair runs in a fresh process (its own peak RSS), the folders in turn at each batch size so
that a drift of the machine's speed hits both alike: load, a short warm-up, then `batch` images captioned
together (`Captioner.caption`, a static batch: every caption `--new-tokens` long, so they all end together).
Reported: images/s, decode ms per step (one token for every row), its ratio to the batch-1 step, prefill
and vision ms per image, peak RSS. Writes benchmarks/results/cpu-batch-NAME.{json,md} with `--name`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run(folder: str, batch: int, new_tokens: int) -> dict[str, Any]:
    """One measurement, in this process."""
    from palionnx import Captioner
    from palionnx.runtime.measure import peak_rss_mb
    from palionnx.samples import sample_images

    captioner = Captioner.load(folder, device="cpu")
    images = sample_images(batch, size=captioner.manifest.image_size)
    captioner.caption(images[: min(batch, 4)], max_new_tokens=2, batch_size=batch, ignore_eos=True)  # warm-up
    started = time.perf_counter()
    results = captioner.caption(images, max_new_tokens=new_tokens, batch_size=batch, ignore_eos=True)
    wall = time.perf_counter() - started
    timings = results[0].timings
    return {"folder": folder, "batch": batch, "new_tokens": new_tokens, "images_per_s": batch / wall,
            "decode_ms_per_step": timings.decode_ms_per_token, "prefill_ms_per_image": 1000 * timings.prefill_s / batch,
            "vision_ms_per_image": 1000 * timings.vision_s / batch, "peak_rss_mb": peak_rss_mb(),
            # an earlier palionnx's folder (FOLDER=SRC) may not know batched decode
            "batch_decode_from": getattr(captioner.manifest.quant.cpu_kernels, "batch_decode_from", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--name", help="write benchmarks/results/cpu-batch-NAME.{json,md}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(*json.loads(args.child))))
        return
    from palionnx.system import cpu_name

    rows = []
    for batch in args.batches:
        for spec in args.folders:
            folder, _, source = spec.partition("=")
            env = dict(os.environ, PYTHONPATH=str(Path(source).resolve())) if source else None
            child = json.dumps([folder, batch, args.new_tokens])
            out = subprocess.run([sys.executable, __file__, "x", "--child", child], capture_output=True, text=True,
                                 env=env)
            if out.returncode:
                sys.exit(f"{spec} at batch {batch} failed: {out.stderr.strip().splitlines()[-1:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(_line(rows[-1], rows), flush=True)
    report = {"cpu": cpu_name(), "new_tokens": args.new_tokens, "rows": rows}
    if args.name:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"cpu-batch-{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / f"cpu-batch-{args.name}.md").write_text(_markdown(report))


def _line(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One row as table cells, with images/s and the decode step against the same folder's batch 1."""
    first = next((r for r in rows if r["folder"] == row["folder"] and r["batch"] == 1), None)
    ratio = f"{row['decode_ms_per_step'] / first['decode_ms_per_step']:.2f}x" if first else "-"
    speedup = f"{row['images_per_s'] / first['images_per_s']:.2f}x" if first else "-"
    return (f"{row['folder']} | {row['batch']} | {row['images_per_s']:.4f} ({speedup}) | "
            f"{row['decode_ms_per_step']:.1f} ({ratio}) | {row['prefill_ms_per_image']:.0f} | "
            f"{row['vision_ms_per_image']:.0f} | {row['peak_rss_mb']:.0f}")


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"CPU: {report['cpu']}; {report['new_tokens']} new tokens per caption (eos ignored), static batches.", "",
             "| folder | batch | images/s (vs batch 1) | decode ms per step (vs batch 1) | prefill ms per image | "
             "vision ms per image | peak RSS MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = []
    for row in report["rows"]:
        rows.append(row)
        lines.append("| " + _line(row, rows) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

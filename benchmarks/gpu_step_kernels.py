"""Where one CUDA decode step's time goes, kernel by kernel (Nsight Compute on a lent GPU machine).

    ncu --clock-control none --nvtx --nvtx-include "decode_step/" --metrics gpu__time_duration.sum --csv \
        --log-file kernels.csv python benchmarks/gpu_step_kernels.py FOLDER
    python benchmarks/gpu_step_kernels.py --summarize kernels.csv

The first form prefills one caption, runs a few decode steps, then one more inside an NVTX range named
decode_step (the CUDA graph off, so each kernel is launched and profiled on its own). The second sums the
kernels' durations by name: their total against the step's measured time says how much of a step is
kernels and how much is gaps between them.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys
from pathlib import Path


def profile(folder: Path) -> None:
    from palionnx import Captioner
    from palionnx.runtime.defaults import DEFAULT_PROMPT
    from palionnx.runtime.preprocess import image_pixels
    from palionnx.samples import sample_images

    captioner = Captioner.load(folder, device="cuda", cuda_graph=False)
    import torch  # after onnxruntime has loaded its CUDA libraries; only for torch's NVTX bindings

    image = sample_images(1, size=captioner.manifest.image_size)[0]
    batch = captioner.prompt_batch(image_pixels(image, captioner.image_spec)[None], [DEFAULT_PROMPT])
    state = captioner.model.new_state(1, batch.input_ids.shape[1] + 64)
    tokens = state.prefill(batch).next_token()
    for _ in range(4):
        tokens = state.step(tokens).next_token()
    torch.cuda.nvtx.range_push("decode_step")
    tokens = state.step(tokens).next_token()
    torch.cuda.nvtx.range_pop()


def summarize(path: Path) -> None:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for row in csv.DictReader(lines[start:]):
        if row["Metric Name"] != "gpu__time_duration.sum":
            continue
        scale = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3}[row["Metric Unit"]]
        name = row["Kernel Name"].split("(")[0].split("<")[0][:60]
        total[name] += float(row["Metric Value"].replace(",", "")) * scale
        count[name] += 1
    overall = sum(total.values())
    print(f"{sum(count.values())} kernels, {overall / 1000:.3f} ms of kernel time in one decode step")
    print("| kernel | launches | µs | share |\n| --- | ---: | ---: | ---: |")
    for name, micros in total.most_common(20):
        print(f"| {name} | {count[name]} | {micros:.1f} | {micros / overall:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--summarize", type=Path)
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    elif args.folder:
        profile(args.folder)
    else:
        sys.exit("give a model folder to profile, or --summarize CSV")


if __name__ == "__main__":
    main()

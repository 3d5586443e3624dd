"""`palionnx bench`: latency of model folders, each measured in a fresh subprocess (clean peak RSS).

Fixed generated length (eos ignored), a warm-up run excluded, the median of the repeats.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..runtime.manifest import Manifest


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM on Linux, which (unlike ru_maxrss) is not inherited
    from the parent across fork + exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_memory_mb() -> float | None:
    """This process's GPU memory from nvidia-smi, if there is one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, used = (part.strip() for part in line.split(","))
        if pid == str(os.getpid()):
            return float(used)
    return None


def measure(folder: Path, images: int, max_new_tokens: int, batch_size: int, device: str, repeats: int) -> dict:
    """Load the folder and time captioning `images` synthetic images; run in the process that reports."""
    from ..runtime.captioner import Captioner
    from ..samples import sample_images

    started = time.perf_counter()
    captioner = Captioner.load(folder, device=device)
    load_s = time.perf_counter() - started
    inputs = sample_images(images, size=Manifest.load(folder).image_size)

    def run() -> dict:
        started = time.perf_counter()
        results = captioner.caption(inputs, max_new_tokens=max_new_tokens, batch_size=batch_size, ignore_eos=True)
        wall = time.perf_counter() - started
        batches = {id(r.timings): r.timings for r in results}.values()  # one Timings per batch
        return {
            "wall_s": wall,
            "vision_ms_per_image": 1000 * sum(t.vision_s for t in batches) / len(inputs),
            "prefill_ms": 1000 * statistics.mean(t.prefill_s for t in batches),
            "decode_ms_per_token": statistics.mean(t.decode_ms_per_token for t in batches),
        }

    run()  # warm-up: first-run allocations and kernel selection
    runs = [run() for _ in range(repeats)]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    manifest = Manifest.load(folder)
    return {
        "model": str(folder),
        "quant": manifest.quant["level"],
        "providers": captioner.providers,
        "load_s": load_s,
        "vision_ms_per_image": median["vision_ms_per_image"],
        "prefill_ms": median["prefill_ms"],
        "decode_ms_per_token": median["decode_ms_per_token"],
        "tokens_per_s": 1000 / median["decode_ms_per_token"] * min(batch_size, images)
        if median["decode_ms_per_token"] else 0.0,
        "images_per_s": images / median["wall_s"],
        "peak_rss_mb": peak_rss_mb(),
        "gpu_memory_mb": gpu_memory_mb() if "CUDAExecutionProvider" in captioner.providers else None,
        "size_on_disk_mb": folder_size(folder) / 1e6,
        "images": images, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "repeats": repeats,
    }


def measure_in_subprocess(folder: Path, images: int, max_new_tokens: int, batch_size: int, device: str,
                          repeats: int) -> dict:
    """`measure` in a fresh interpreter, so each folder's peak RSS is its own."""
    args = json.dumps([str(folder), images, max_new_tokens, batch_size, device, repeats])
    out = subprocess.run([sys.executable, "-m", "palionnx.cli.bench", args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark of {folder} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


COLUMNS = [
    ("model", "model", "{}"), ("quant", "quant", "{}"), ("load_s", "load s", "{:.2f}"),
    ("vision_ms_per_image", "vision ms/img", "{:.1f}"), ("prefill_ms", "prefill ms", "{:.1f}"),
    ("decode_ms_per_token", "decode ms/tok", "{:.2f}"), ("tokens_per_s", "tok/s", "{:.1f}"),
    ("images_per_s", "img/s", "{:.3f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("gpu_memory_mb", "GPU MB", "{:.0f}"), ("size_on_disk_mb", "disk MB", "{:.0f}"),
]


def table(rows: list[dict]) -> str:
    """A plain text table, one row per model folder."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


if __name__ == "__main__":
    folder, images, max_new_tokens, batch_size, device, repeats = json.loads(sys.argv[1])
    print(json.dumps(measure(Path(folder), images, max_new_tokens, batch_size, device, repeats)))

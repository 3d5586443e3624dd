"""Latency and memory of a model folder: what `palionnx bench` and `benchmarks/` report.

Fixed generated length (eos ignored), a warm-up run excluded, the median of the repeats. `measure` runs in
the process that reports; `measure_in_subprocess` gives each folder a fresh interpreter (its own peak RSS).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..system import cpu_name, nvidia_gpus, process_gpu_memory_mb, rss_bytes
from .captioner import Captioner
from .contract import folder_size
from .preprocess import image_pixels


def peak_rss_mb() -> float:
    """This process's peak resident memory (on Linux VmHWM, which unlike ru_maxrss is not inherited from
    the parent across fork + exec); 0 where the OS does not say."""
    return (rss_bytes(peak=True) or 0) / 2**20


def device_name(device: str) -> str:
    """What a report names the machine by: the first GPU's name (nvidia-smi) for "cuda", else the CPU's."""
    if device == "cuda":
        gpus = nvidia_gpus()
        return gpus[0].name if gpus else "CUDA"
    return cpu_name()


def measure(folder: Path, *, images: int, max_new_tokens: int, batch_size: int, device: str,
            repeats: int) -> dict[str, Any]:
    """Load the folder and time captioning `images` synthetic images `repeats` times (after a warm-up).

    Returns load s, vision ms per image, prefill ms, decode ms per token, tokens/s, images/s (static
    batches of one length), images/s and slot occupancy with continuous batching over lengths that vary
    (`continuous`), peak RSS MB, GPU MB (on CUDA) and size on disk, with the settings; for CPU int8/int4
    folders the kernels the export chose, and (with a decoder_prefill graph) the prefill's ms without it.
    """
    from ..samples import sample_images

    started = time.perf_counter()
    captioner = Captioner.load(folder, device=device)
    load_s = time.perf_counter() - started
    inputs = sample_images(images, size=captioner.manifest.image_size)

    def run() -> dict[str, float]:
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
    decode_ms = median["decode_ms_per_token"]
    continuous_rate, occupancy = continuous(captioner, inputs, max_new_tokens, batch_size)
    kernels = captioner.manifest.quant.cpu_kernels
    return {
        "model": str(folder),
        "quant": captioner.manifest.quant.level,
        "cpu_kernels": dataclasses.asdict(kernels) if kernels else None,
        "prefill_ms_on_decoder": prefill_on_decoder_ms(captioner, inputs[:batch_size]),
        "device": captioner.device,
        "providers": captioner.providers,
        "load_s": load_s,
        "vision_ms_per_image": median["vision_ms_per_image"],
        "prefill_ms": median["prefill_ms"],
        "decode_ms_per_token": decode_ms,
        "tokens_per_s": 1000 / decode_ms * min(batch_size, images) if decode_ms else 0.0,
        "images_per_s": images / median["wall_s"],
        "images_per_s_continuous": continuous_rate,
        "slot_occupancy": occupancy,
        "peak_rss_mb": peak_rss_mb(),
        "gpu_memory_mb": process_gpu_memory_mb() if captioner.device == "cuda" else None,
        "size_on_disk_mb": folder_size(folder) / 1e6,
        "images": images, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "repeats": repeats,
    }


def prefill_on_decoder_ms(captioner: Captioner, images: list[Any]) -> float | None:
    """Where the folder runs prompts on a decoder_prefill graph: the prefill's ms on the decoder graph
    instead (best of two), to show what the prefill graph buys. None for folders without one."""
    model = captioner.model
    if model.prefill_decoder is model.decoder:
        return None
    prefill_graph = model.prefill_decoder
    model.prefill_decoder = model.decoder
    try:
        runs = [captioner.caption(images, max_new_tokens=2, batch_size=len(images), ignore_eos=True)
                for _ in range(2)]
    finally:
        model.prefill_decoder = prefill_graph
    return 1000 * min(run[0].timings.prefill_s for run in runs)


def continuous(captioner: Captioner, images: list[Any], max_new_tokens: int, slots: int) -> tuple[float, float]:
    """Continuous batching over `slots`: (images/s, slot occupancy) for captions whose lengths spread over
    25-100 % of `max_new_tokens` (fixed lengths, eos ignored), as real captions end at different tokens."""
    from .request import Request
    from .scheduler import Scheduler

    spread = [1.0, 0.5, 0.25, 0.75]
    requests = [Request(image_pixels(image, captioner.image_spec), max_new_tokens=max(1, int(max_new_tokens * f)),
                        ignore_eos=True) for image, f in zip(images, spread * len(images))]
    max_len = len(captioner.text.prompt_ids(requests[0].prompt)) + max_new_tokens
    scheduler = Scheduler(captioner.model, captioner.text, slots, max_len)
    started = time.perf_counter()
    done = sum(1 for _ in scheduler.run(requests))
    return done / (time.perf_counter() - started), scheduler.occupancy.ratio(slots)


def decode_step_ms(captioner: Captioner, allocated: int, steps: int = 64) -> float:
    """ms per decode step for the first `steps` tokens of one caption whose cache has room for `allocated`
    new tokens: with attention over the filled length only, it does not depend on `allocated`."""
    from ..samples import sample_images
    from .defaults import DEFAULT_PROMPT

    image = sample_images(1, size=captioner.manifest.image_size)[0]
    batch = captioner.prompt_batch(image_pixels(image, captioner.image_spec)[None], [DEFAULT_PROMPT])
    state = captioner.model.new_state(1, batch.input_ids.shape[1] + allocated)
    tokens = state.prefill(batch).next_token()
    for _ in range(3):  # warm-up (and, on CUDA, the graph capture)
        tokens = state.step(tokens).next_token()
    state.reset()
    tokens = state.prefill(batch).next_token()
    started = time.perf_counter()
    for _ in range(steps):
        tokens = state.step(tokens).next_token()
    return 1000 * (time.perf_counter() - started) / steps


class MeasureRefused(RuntimeError):
    """The folder cannot be measured as asked (a broken folder, a device it cannot run on): the user's to fix."""


def measure_in_subprocess(folder: Path, **settings: Any) -> dict[str, Any]:
    """`measure(folder, **settings)` in a fresh interpreter, so each folder's peak RSS is its own.

    Raises MeasureRefused with the child's message when the folder or device is unusable, RuntimeError with
    the child's last error line when it fails otherwise.
    """
    args = json.dumps([str(folder), settings])
    out = subprocess.run([sys.executable, "-m", "palionnx.runtime.measure", args], capture_output=True, text=True)
    if out.returncode == 2 and out.stderr.startswith("error: "):  # see _main
        raise MeasureRefused(out.stderr.strip().splitlines()[-1].removeprefix("error: "))
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise RuntimeError(f"benchmark of {folder} failed: {lines[-1] if lines else f'exit {out.returncode}'}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main() -> None:
    """Child process of `measure_in_subprocess`: a model-folder or device problem is one line, exit 2."""
    from .manifest import ModelFolderError
    from .sessions import DeviceError

    folder_arg, settings_arg = json.loads(sys.argv[1])
    try:
        print(json.dumps(measure(Path(folder_arg), **settings_arg)))
    except (ModelFolderError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _main()

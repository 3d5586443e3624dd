"""The big and high-resolution PaliGemmas on this machine: export and caption within its memory.

    python benchmarks/big_models.py --geometry pg2-10b-224 --levels int4 int8 --new-tokens 256
    python benchmarks/big_models.py --geometry pg1-3b-896 --levels int4 --new-tokens 16
    python benchmarks/big_models.py --extrapolate pg2-28b-224-l4 pg2-28b-224-l8 --layers 46

For one random-weight geometry (`palionnx synth`): the checkpoint written (seconds, peak RSS), each level
exported (`palionnx.export.convert.export`) under `/usr/bin/time -v` (seconds, peak RSS, folder size), then
one caption of one image in a fresh process (fixed length, eos ignored, after a 2-token warm-up): vision ms,
prefill ms, decode ms/token, seconds per caption, RSS after loading and the peak of each phase (RSS sampled
every 5 ms; the vision encoder also alone, before the caption), and `runtime/limits.py`'s estimate of the
caption's memory beside the measured growth over the loaded RSS. The transformers row is run when its float32
weights fit in the available RAM, else the reason is recorded.
Writes benchmarks/results/big-GEOMETRY.json and .md. `--extrapolate SHORT LONG --layers N` reads two such
reports of one model truncated to different layer counts and writes, as a straight line through them, what the
whole model's decoder would cost (big-SHORT-extrapolated.md): an extrapolation, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9
EXPORT = ("import sys; from palionnx.export.convert import export; "
          "export(sys.argv[1], sys.argv[2], quant=sys.argv[3], device='cpu', progress=print)")


@contextmanager
def peak_rss(into: dict[str, float], key: str, interval_s: float = 0.005) -> Iterator[None]:
    """Record in `into[key]` the largest RSS (GB) sampled while the block runs."""
    from palionnx.system import rss_bytes

    stop = threading.Event()
    peak = [float(rss_bytes() or 0)]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], float(rss_bytes() or 0))
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        into[key] = max(peak[0], float(rss_bytes() or 0)) / GB


def timed_command(command: list[str]) -> dict[str, float]:
    """Run `command` under /usr/bin/time -v: wall seconds and peak RSS GB (fails loudly on a non-zero exit)."""
    out = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    peak_kb = int(_field(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr))
    clock = _field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", out.stderr)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return {"seconds": seconds, "peak_rss_gb": peak_kb * 1024 / GB}


def _field(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"no {pattern!r} in /usr/bin/time's report")
    return found.group(1)


def folder_gb(folder: Path) -> float:
    from palionnx.runtime.contract import folder_size

    return folder_size(folder) / GB


def measure_caption(folder: Path, new_tokens: int, warmup_tokens: int) -> dict[str, Any]:
    """In this process: load `folder`, caption one sample image, and report times, RSS and the estimate."""
    from palionnx import Captioner
    from palionnx.runtime.defaults import DEFAULT_PROMPT
    from palionnx.runtime.limits import request_bytes
    from palionnx.runtime.preprocess import image_pixels
    from palionnx.samples import sample_images
    from palionnx.system import rss_bytes

    memory: dict[str, float] = {}
    started = time.perf_counter()
    with peak_rss(memory, "load_peak_gb"):
        captioner = Captioner.load(folder, device="cpu")
    load_s = time.perf_counter() - started
    memory["loaded_gb"] = (rss_bytes() or 0) / GB
    image = sample_images(1, size=captioner.manifest.image_size)[0]
    if warmup_tokens:
        captioner.caption([image], max_new_tokens=warmup_tokens, ignore_eos=True)
    memory["after_warmup_gb"] = (rss_bytes() or 0) / GB
    with peak_rss(memory, "vision_peak_gb"):  # the vision encoder alone: its attention over every patch
        captioner.model.encode_images(image_pixels(image, captioner.image_spec)[None])
    with peak_rss(memory, "caption_peak_gb"):
        started = time.perf_counter()
        result = captioner.caption([image], max_new_tokens=new_tokens, ignore_eos=True)[0]
        wall = time.perf_counter() - started
    timings = result.timings
    prompt_len = len(captioner.text.prompt_ids(DEFAULT_PROMPT))
    estimate = request_bytes(captioner.manifest, 1, prompt_len, new_tokens, captioner.model.min_cache_slots,
                             captioner.model.prefill_chunk)
    return {
        "level": captioner.manifest.quant.level, "load_s": load_s, "vision_ms": 1000 * timings.vision_s,
        "prefill_ms": 1000 * timings.prefill_s, "decode_ms_per_token": timings.decode_ms_per_token,
        "caption_s": wall, "prompt_tokens": prompt_len, "new_tokens": new_tokens, **memory,
        "caption_growth_gb": memory["caption_peak_gb"] - memory["loaded_gb"],
        "limits_estimate_gb": estimate / GB,
    }


def transformers_row(checkpoint: Path, new_tokens: int) -> dict[str, Any]:
    """transformers fp32 `generate()` when its weights fit in the available RAM (with 2 GB to spare), else why
    not."""
    from palionnx.system import memory as system_memory

    config = json.loads((checkpoint / "config.json").read_text())
    weight_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    element = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(config.get("dtype")), 2)
    fp32_gb = weight_bytes / element * 4 / GB
    available = system_memory()
    available_gb = ((available.available if available else None) or 0) / GB
    if fp32_gb + 2 > available_gb:
        return {"engine": "transformers", "level": "fp32", "ran": False,
                "reason": f"cannot run: its float32 weights alone take {fp32_gb:.1f} GB and {available_gb:.1f} GB "
                          "of RAM is available"}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import in_subprocess

    row = in_subprocess("transformers", checkpoint, 1, new_tokens)
    return {"engine": "transformers", "level": "fp32", "ran": True, **row}


def cpu_model() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import cpu_model as name

    return name()


def markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [f"`{a['geometry']}` ({report['params_b']:.2f} B parameters), one image, {a['new_tokens']} new tokens "
             f"(eos ignored). Machine: {report['machine']}.", "",
             f"Checkpoint written (`write_checkpoint`, bf16 safetensors): {report['checkpoint']['seconds']:.0f} s, "
             f"peak RSS {report['checkpoint']['peak_rss_gb']:.1f} GB, {report['checkpoint']['gb']:.1f} GB on disk.",
             "", "| level | kernels (vision / prefill / decode) | export s | export peak RSS GB | folder GB | load s "
             "| RSS loaded GB | vision ms "
             "| prefill ms | decode ms/tok | s per caption | caption peak RSS GB | growth GB | limits.py estimate GB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["levels"]:
        e, c = row["export"], row["caption"]
        kernels = " / ".join(str(k) for k in row.get("kernels", {}).values()) or "—"
        lines.append(f"| {c['level']} | {kernels} | {e['seconds']:.0f} | {e['peak_rss_gb']:.1f} | "
                     f"{row['folder_gb']:.2f} | {c['load_s']:.1f} | {c['loaded_gb']:.1f} | {c['vision_ms']:.0f} | "
                     f"{c['prefill_ms']:.0f} | {c['decode_ms_per_token']:.0f} | {c['caption_s']:.1f} | "
                     f"{c['caption_peak_gb']:.1f} | {c['caption_growth_gb']:.2f} | {c['limits_estimate_gb']:.2f} |")
    t = report["transformers"]
    if t["ran"]:
        # decode is what the whole generate() took beyond vision and prefill, timed apart: with few new
        # tokens after a long prompt the difference is within the prefill's own variation
        decode = f"{t['decode_ms_per_token']:.0f} ms/token" if t["decode_ms_per_token"] > 0 else "not resolved"
        lines += ["", f"transformers fp32: vision {t['vision_ms_per_image']:.0f} ms, prefill {t['prefill_ms']:.0f} "
                      f"ms, decode {decode}, peak RSS {t['peak_rss_mb'] / 1000:.1f} GB."]
    else:
        lines += ["", f"transformers fp32: {t['reason']}."]
    return "\n".join(lines) + "\n"


EXTRAPOLATED = ("prefill_ms", "decode_ms_per_token", "loaded_gb", "caption_peak_gb")


def extrapolate(short: dict[str, Any], long: dict[str, Any], layers: int) -> str:
    """The whole decoder's cost per level, from two layer-truncated reports (a line through the two)."""
    count = [report["config"]["num_hidden_layers"] for report in (short, long)]
    lines = [f"Extrapolated to {layers} decoder layers from `{short['args']['geometry']}` ({count[0]} layers) and "
             f"`{long['args']['geometry']}` ({count[1]}), {short['args']['new_tokens']} new tokens; machine: "
             f"{short['machine']}. Not measured: a straight line through the two runs.", "",
             "| level | " + " | ".join(EXTRAPOLATED) + " | per layer | folder GB | export s |",
             "| --- |" + " ---: |" * (len(EXTRAPOLATED) + 3)]
    for a, b in zip(short["levels"], long["levels"], strict=True):
        ca, cb = a["caption"], b["caption"]
        slope = {key: (cb[key] - ca[key]) / (count[1] - count[0]) for key in EXTRAPOLATED}
        whole = {key: ca[key] + slope[key] * (layers - count[0]) for key in EXTRAPOLATED}
        folder, seconds = (x + (y - x) / (count[1] - count[0]) * (layers - count[0]) for x, y in
                           ((a["folder_gb"], b["folder_gb"]), (a["export"]["seconds"], b["export"]["seconds"])))
        lines.append(f"| {ca['level']} | " + " | ".join(f"{whole[key]:.1f}" for key in EXTRAPOLATED)
                     + " | " + ", ".join(f"{slope[key]:.3g}" for key in EXTRAPOLATED) + f" | {folder:.1f} | "
                     f"{seconds:.0f} |")
    return "\n".join(lines) + "\n"


def write_extrapolation(names: list[str], layers: int) -> str:
    """`extrapolate` the reports of the geometries `names` (short, long), written to big-SHORT-extrapolated.md."""
    short, long = (json.loads((RESULTS / f"big-{name}.json").read_text()) for name in names)
    text = extrapolate(short, long, layers)
    (RESULTS / f"big-{names[0]}-extrapolated.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="pg2-10b-224")
    parser.add_argument("--levels", nargs="+", default=["int4", "int8"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--warmup-tokens", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/work/big"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and folders (default: remove them)")
    parser.add_argument("--caption", help=argparse.SUPPRESS)
    parser.add_argument("--extrapolate", nargs=2, metavar=("SHORT", "LONG"))
    parser.add_argument("--layers", type=int, default=46)
    args = parser.parse_args()
    if args.extrapolate:
        print(write_extrapolation(args.extrapolate, args.layers))
        return
    if args.caption:
        print(json.dumps(measure_caption(Path(args.caption), args.new_tokens, args.warmup_tokens)))
        return

    palionnx = [sys.executable, "-m", "palionnx"]
    checkpoint = args.work / args.geometry
    started = time.perf_counter()
    written = timed_command([*palionnx, "synth", args.geometry, "-o", str(checkpoint), "--dtype", "bfloat16"])
    print(f"checkpoint: {written} ({time.perf_counter() - started:.0f} s)", flush=True)
    config = json.loads((checkpoint / "config.json").read_text())
    report: dict[str, Any] = {
        "machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores",
        "args": vars(args) | {"work": str(args.work)},
        "checkpoint": written | {"gb": folder_gb(checkpoint)}, "config": config.get("text_config"),
        "params_b": folder_gb(checkpoint) / 2, "levels": [],
    }
    report["transformers"] = transformers_row(checkpoint, args.new_tokens)
    print(f"transformers: {report['transformers'].get('reason', 'ran')}", flush=True)
    for level in args.levels:
        folder = args.work / f"{args.geometry}-{level}"
        # the export itself, through the Python API: the CLI's plan check would refuse what its estimate
        # doubts, and these runs are what its figures come from
        exported = timed_command([sys.executable, "-c", EXPORT, str(checkpoint), str(folder), level])
        print(f"{level} export: {exported}", flush=True)
        out = subprocess.run([sys.executable, __file__, "--caption", str(folder), "--new-tokens", str(args.new_tokens),
                              "--warmup-tokens", str(args.warmup_tokens)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        caption = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{level} caption: {caption}", flush=True)
        kernels = json.loads((folder / "palionnx.json").read_text())["quant"].get("cpu_kernels") or {}
        chosen = {part: kernels.get(part) for part in ("vision", "prefill", "decode")}
        report["levels"].append({"export": exported, "folder_gb": folder_gb(folder), "kernels": chosen,
                                 "caption": caption})
        if not args.keep:
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"big-{args.geometry}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(checkpoint)], check=True)


if __name__ == "__main__":
    main()

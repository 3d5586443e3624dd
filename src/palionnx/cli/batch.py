"""Batch captioning of image files: skip what is done, write atomically, report progress and a summary."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..runtime.captioner import Captioner, CaptionResult
from .files import ImageJob, caption_path, clean_caption, remove_stale_temp_files, write_atomic


@dataclass
class BatchOptions:
    """What `palionnx caption` does with each image (see its --help)."""

    ext: str = ".txt"
    output_dir: Path | None = None
    overwrite: bool = False
    jsonl: Path | None = None
    prefix: str = ""
    suffix: str = ""
    clean: bool = False
    prompt: str = "caption en"
    max_new_tokens: int = 256
    batch_size: int = 4
    generation: dict[str, Any] = field(default_factory=dict)  # temperature, top_k, ... for Captioner.caption


@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False

    def line(self) -> str:
        rate = self.captioned / self.elapsed_s if self.elapsed_s else 0.0
        state = "interrupted: " if self.interrupted else ""
        return (f"{state}{self.captioned} captioned, {self.skipped} skipped, {self.failed} failed "
                f"in {self.elapsed_s:.1f}s ({rate:.2f} images/s)")


class Progress:
    """A one-line bar on a terminal (done/total, images/s, ETA); plain lines otherwise; nothing when quiet."""

    def __init__(self, total: int, quiet: bool = False, stream: IO[str] = sys.stderr):
        self.total, self.quiet, self.stream = total, quiet, stream
        self.tty = stream.isatty()
        self.done = 0
        self.start = time.perf_counter()

    def update(self, path: Path, status: str, error: str | None = None) -> None:
        """Count one image; an error is always shown, on a line of its own."""
        self.done += 1
        if error and (self.tty or self.quiet):
            self.error(f"error: {error}")
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed else 0.0
        if self.tty:
            eta = (self.total - self.done) / rate if rate else 0.0
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            clock = time.strftime("%H:%M:%S", time.gmtime(eta))
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {rate:.2f} img/s ETA {clock} ")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            line = f"error: {error}" if error else f"{path}: {status}"  # an error names its file
            self.stream.write(f"[{self.done}/{self.total}] {line}\n")
        self.stream.flush()

    def error(self, message: str) -> None:
        """A message on its own line, even when quiet (clearing the bar on a terminal)."""
        self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        self.stream.flush()


def caption_files(captioner: Captioner, jobs: list[ImageJob], options: BatchOptions, quiet: bool = False) -> Summary:
    """Caption `jobs`, writing one caption file per image. Ctrl-C abandons the current batch cleanly."""
    summary = Summary()
    start = time.perf_counter()
    targets = {job: caption_path(job, options.ext, options.output_dir) for job in jobs}
    remove_stale_temp_files({path.parent for path in targets.values()})
    todo, seen = [], {}
    progress = Progress(len(jobs), quiet)
    for job in jobs:
        target = targets[job]
        if target in seen:
            summary.failed += 1
            progress.error(f"error: {job.image}: its caption {target} would overwrite that of {seen[target]}")
        elif target.exists() and not options.overwrite:
            summary.skipped += 1
        else:
            todo.append(job)
        seen.setdefault(target, job.image)
    progress.total = len(todo)
    if summary.skipped and not quiet:
        progress.error(f"skipping {summary.skipped} images that already have a {options.ext} caption")

    jsonl = open(options.jsonl, "a", encoding="utf-8") if options.jsonl else None  # noqa: SIM115
    try:
        for first in range(0, len(todo), options.batch_size):
            batch = todo[first : first + options.batch_size]
            results = captioner.caption(
                [job.image for job in batch], prompt=options.prompt, max_new_tokens=options.max_new_tokens,
                batch_size=options.batch_size, **options.generation,
            )
            for job, result in zip(batch, results):
                _finish(job, result, targets[job], options, summary, progress, jsonl)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if jsonl:
            jsonl.close()
    summary.elapsed_s = time.perf_counter() - start
    return summary


def _finish(job: ImageJob, result: CaptionResult, target: Path, options: BatchOptions, summary: Summary,
            progress: Progress, jsonl: IO[str] | None) -> None:
    text = ""
    if result.ok:
        text = options.prefix + (clean_caption(result.text) if options.clean else result.text) + options.suffix
        try:
            write_atomic(target, text)
        except OSError as exc:
            result.error = f"{target}: cannot write the caption ({exc})"
    if result.ok:
        summary.captioned += 1
    else:
        summary.failed += 1
    progress.update(job.image, f"{len(result.tokens)} tokens", result.error)
    if jsonl:
        timings = result.timings
        record = {
            "path": str(job.image), "output": str(target) if result.ok else None,
            "caption": text if result.ok else None, "tokens": len(result.tokens), "error": result.error,
            "timings": {"vision_s": round(timings.vision_s, 4), "prefill_s": round(timings.prefill_s, 4),
                        "decode_ms_per_token": round(timings.decode_ms_per_token, 3)},
        }
        jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        jsonl.flush()

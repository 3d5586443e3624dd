"""Batch captioning of image files: skip what is done, write atomically, report progress and a summary."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from ..runtime.captioner import Captioner, CaptionResult
from ..runtime.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from ..runtime.generate import LogitsProcessor, Sampler, greedy
from ..runtime.scheduler import CaptionStream
from .files import ImageJob, caption_path, clean_caption, remove_stale_temp_files, write_atomic


@dataclass
class BatchOptions:
    """What `palionnx caption` does with each image (see its --help)."""

    ext: str = ".txt"
    output_dir: Path | None = None
    overwrite: bool = False
    jsonl: Path | None = None
    parquet: Path | None = None
    prefix: str = ""
    suffix: str = ""
    clean: bool = False
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int | None = None  # None: the device's default (Captioner.default_batch_size)
    sampler: Sampler = greedy  # from make_sampler
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # from make_logits_processors


@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    occupancy: float | None = None  # continuous batching: mean busy slots / slots

    def line(self) -> str:
        rate = self.captioned / self.elapsed_s if self.elapsed_s else 0.0
        state = "interrupted: " if self.interrupted else ""
        busy = f", slots {self.occupancy:.0%} busy" if self.occupancy is not None else ""
        return (f"{state}{self.captioned} captioned, {self.skipped} skipped, {self.failed} failed "
                f"in {self.elapsed_s:.1f}s ({rate:.2f} images/s{busy})")


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


@dataclass
class Plan:
    """What a run will do: the images to caption and where each caption goes."""

    todo: list[ImageJob]
    targets: dict[ImageJob, Path]
    summary: Summary  # skipped and colliding images are counted already
    progress: Progress


def plan_run(jobs: list[ImageJob], options: BatchOptions, quiet: bool = False) -> Plan:
    """Map images to caption files, skip those already captioned, report collisions, clean stale temps."""
    summary = Summary()
    targets = {job: caption_path(job, options.ext, options.output_dir) for job in jobs}
    remove_stale_temp_files({path.parent for path in targets.values()})
    todo: list[ImageJob] = []
    seen: dict[Path, Path] = {}
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
    return Plan(todo, targets, summary, progress)


@dataclass
class Record:
    """One line of --jsonl."""

    path: str
    tokens: int = 0
    error: str | None = None
    output: str | None = None
    caption: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def publish(result: CaptionResult, target: Path, options: BatchOptions, exclusive: bool = False) -> Record:
    """Write one image's caption file (prefix, --clean, suffix applied) and return its record.

    With `exclusive`, an existing caption file is left alone (a retried task must not write twice).
    """
    record = Record(path=str(result.source), tokens=len(result.tokens), error=result.error,
                    timings={"vision_s": round(result.timings.vision_s, 4),
                             "prefill_s": round(result.timings.prefill_s, 4),
                             "decode_ms_per_token": round(result.timings.decode_ms_per_token, 3)})
    if result.ok:
        text = options.prefix + (clean_caption(result.text) if options.clean else result.text) + options.suffix
        try:
            write_atomic(target, text, exclusive=exclusive)
            record.output, record.caption = str(target), text
        except FileExistsError:
            record.output, record.caption = str(target), target.read_text(encoding="utf-8")
        except OSError as exc:
            record.error = f"{target}: cannot write the caption ({exc})"
    return record


class Recorder:
    """Counts results into the summary, updates progress and appends --jsonl lines."""

    def __init__(self, plan: Plan, options: BatchOptions):
        self.summary, self.progress = plan.summary, plan.progress
        self.jsonl = open(options.jsonl, "a", encoding="utf-8") if options.jsonl else None  # noqa: SIM115
        self.parquet = options.parquet
        self.records: list[dict] = []

    def add(self, record: Record) -> None:
        if record.error is None:
            self.summary.captioned += 1
        else:
            self.summary.failed += 1
        self.progress.update(Path(record.path), f"{record.tokens} tokens", record.error)
        if self.jsonl:
            self.jsonl.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
            self.jsonl.flush()
        if self.parquet:
            self.records.append(asdict(record))

    def close(self) -> None:
        """Close --jsonl; write --parquet (one row per image of this run, written at the end)."""
        if self.jsonl:
            self.jsonl.close()
        if self.parquet and self.records:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(self.records), self.parquet)


@contextmanager
def recording(plan: Plan, options: BatchOptions, started: float) -> Iterator[Recorder]:
    """Record results for a run; Ctrl-C ends it cleanly (summary marked interrupted), outputs closed."""
    recorder = Recorder(plan, options)
    try:
        yield recorder
    except KeyboardInterrupt:
        plan.summary.interrupted = True
    finally:
        recorder.close()
        plan.summary.elapsed_s = time.perf_counter() - started


def caption_files(captioner: Captioner, jobs: list[ImageJob], options: BatchOptions, quiet: bool = False) -> Summary:
    """Caption `jobs` in this process with continuous batching (`--batch-size` slots, each refilled when its
    caption ends), writing each caption file as soon as it is done. Ctrl-C abandons the captions in flight."""
    started = time.perf_counter()
    plan = plan_run(jobs, options, quiet)
    with recording(plan, options, started) as recorder:
        stream = CaptionStream(
            captioner, ((job, job.image) for job in plan.todo), slots=options.batch_size, prompt=options.prompt,
            max_new_tokens=options.max_new_tokens, sampler=options.sampler,
            logits_processors=options.logits_processors,
        )
        for job, result in stream:
            recorder.add(publish(result, plan.targets[job], options))
            plan.summary.occupancy = stream.occupancy
    return plan.summary

"""Batch captioning of image files: plan the run, share the folder with other runs, write atomically,
report progress, --jsonl and a summary."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ..runtime.captioner import Captioner, CaptionResult
from ..runtime.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from ..runtime.generate import LogitsProcessor, Sampler, greedy
from ..runtime.preprocess import ImageInput
from ..runtime.stream import CaptionStream, Retry
from .claims import CLAIM_SUFFIX, Claims, claim_path, recover_stale
from .files import ImageJob, append_line, caption_path, clean_caption, remove_stale_temp_files, write_atomic
from .progress import Progress, print_line

WAIT_FOR_OTHERS_S = 0.5  # how often a run that has finished its share looks at images other runs hold


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
    min_words: int = 0  # caption again (sampling) while the caption has fewer words than this ...
    retries: int = 0  # ... at most this many more times


@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0  # had a caption already
    failed: int = 0
    clashes: int = 0  # not captioned: another image of the same name owns the caption file
    by_others: int = 0  # captioned meanwhile by another run on the same folder
    elapsed_s: float = 0.0
    interrupted: bool = False
    occupancy: float | None = None  # continuous batching: mean busy slots / slots over the decode steps

    def line(self) -> str:
        rate = self.captioned / self.elapsed_s if self.elapsed_s else 0.0
        state = "stopped early: " if self.interrupted else ""
        extra = "".join([f", {self.by_others} done by other runs" if self.by_others else "",
                         f", {self.clashes} name clash{'es' if self.clashes > 1 else ''}" if self.clashes else ""])
        busy = f", slots {self.occupancy:.0%} busy" if self.occupancy is not None else ""
        resume = "; re-run the same command to resume" if self.interrupted else ""
        return (f"{state}{self.captioned} captioned, {self.skipped} skipped, {self.failed} failed{extra} "
                f"in {self.elapsed_s:.1f}s ({rate:.2f} images/s{busy}){resume}")


@dataclass
class Record:
    """One line of --jsonl. status: captioned, failed, or clash (see `plan_run`)."""

    path: str
    status: str = "captioned"
    tokens: int = 0
    error: str | None = None
    output: str | None = None
    caption: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    attempts: int = 1  # captions generated for the image (more than one with --min-words and --retries)

    def fields(self) -> dict[str, Any]:
        """The record as --jsonl and --parquet store it: text that is not valid UTF-8 (a file name of other
        bytes, which the OS hands over with surrogate escapes) is written with its bad bytes as \\xNN, and for
        `path` and `output` the name's exact bytes go in `path_bytes` / `output_bytes` (base64)."""
        data = asdict(self)
        for key, value in list(data.items()):
            if isinstance(value, str) and not _is_utf8(value):
                data[key] = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                if key in ("path", "output"):
                    data[key + "_bytes"] = base64.b64encode(os.fsencode(value)).decode("ascii")
        return data

    def line(self) -> str:
        return json.dumps(self.fields(), ensure_ascii=False)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Plan:
    """What a run will do: the images to caption, where each caption goes, and what was decided already
    (skips counted in the summary; failures and name clashes as records)."""

    todo: list[ImageJob]
    targets: dict[ImageJob, Path]
    summary: Summary
    early: list[Record] = field(default_factory=list)


def plan_run(jobs: list[ImageJob], options: BatchOptions, quiet: bool = False) -> Plan:
    """Map images to caption files and decide, before any model is loaded, what to do with each.

    - A caption file that exists is skipped (or, with --overwrite, replaced).
    - A caption path that is a folder is an error for that image.
    - Name clash (`a.gif` and `a.webp` both want `a.txt`): the first image in sorted order owns the
      caption file; the others are reported, counted and recorded as clashes, never captioned, and do not
      change the exit status (rename one of them to caption both).
    - Claims and temp files that killed runs left are cleared (see `palionnx.cli.claims`).
    """
    summary = Summary()
    targets = {job: caption_path(job, options.ext, options.output_dir) for job in jobs}
    folders = {path.parent for path in targets.values()}
    remove_stale_temp_files(folders)
    _recover_claims(folders, set(targets.values()))
    todo: list[ImageJob] = []
    early: list[Record] = []
    owner: dict[Path, Path] = {}
    for job in jobs:
        target = targets[job]
        if target in owner:
            early.append(Record(str(job.image), "clash", error=f"not captioned: its caption {target} belongs to "
                                f"{owner[target]} (same name); rename one of them to caption both"))
        elif target.is_dir():
            early.append(Record(str(job.image), "failed", error=f"{target} is a folder, not a caption file"))
        elif target.exists() and not options.overwrite:
            summary.skipped += 1
        else:
            todo.append(job)
        owner.setdefault(target, job.image)
    for record in early:
        print_line(f"{'warning' if record.status == 'clash' else 'error'}: {record.path}: {record.error}")
    if summary.skipped and not quiet:
        print_line(f"skipping {summary.skipped} images that already have a {options.ext} caption")
    return Plan(todo, targets, summary, early)


def _recover_claims(folders: set[Path], targets: set[Path]) -> None:
    """Finish what killed runs left: stale claims beside captions (their --jsonl records included). A claim's
    caption is known from its name, or for a shortened name (a long caption name) from this run's targets."""
    known = {claim_path(target): target for target in targets}
    for folder in folders:
        if folder.is_dir():
            for claim in folder.glob(f".*{CLAIM_SUFFIX}"):
                target = known.get(claim)
                if target is None and claim_path(claim.with_name(claim.name[1 : -len(CLAIM_SUFFIX)])) == claim:
                    target = claim.with_name(claim.name[1 : -len(CLAIM_SUFFIX)])
                if target is not None:
                    recover_stale(claim, target)


def caption_body(text: str, options: BatchOptions) -> str:
    """A raw caption as the caption file holds it, before the prefix and suffix (--clean applied)."""
    return clean_caption(text) if options.clean else text


def caption_text(result: CaptionResult, options: BatchOptions) -> str:
    """The caption file's text: prefix, the caption (--clean applied), suffix."""
    return options.prefix + caption_body(result.text, options) + options.suffix


def retry_policy(options: BatchOptions) -> Retry | None:
    """--min-words / --retries as a `Retry`: words are counted in the caption as written (--clean applied,
    without the prefix and suffix)."""
    if not (options.min_words and options.retries):
        return None
    return Retry(options.min_words, options.retries, words=lambda text: len(caption_body(text, options).split()))


def caption_stream(captioner: Captioner, items: Iterable[tuple[Any, ImageInput] | None], options: BatchOptions
                   ) -> CaptionStream:
    """A CaptionStream over `items` with the run's generation options, --min-words / --retries included."""
    return CaptionStream(captioner, items, slots=options.batch_size, prompt=options.prompt,
                         max_new_tokens=options.max_new_tokens, sampler=options.sampler,
                         logits_processors=options.logits_processors, retry=retry_policy(options))


def publish(result: CaptionResult, target: Path, options: BatchOptions, exclusive: bool = False,
            claims: Claims | None = None) -> Record:
    """Write one image's caption file and return its record.

    With `exclusive`, an existing caption file is left alone (a retried Ray task must not write twice).
    With `claims`, the record is stored in the image's claim first, so a kill right after the caption is
    written still gets its --jsonl line (see `palionnx.cli.claims`).
    """
    record = Record(path=str(result.source), status="captioned" if result.ok else "failed",
                    tokens=len(result.tokens), error=result.error, attempts=result.attempts,
                    timings={"vision_s": round(result.timings.vision_s, 4),
                             "prefill_s": round(result.timings.prefill_s, 4),
                             "decode_ms_per_token": round(result.timings.decode_ms_per_token, 3)})
    if not result.ok:
        return record
    record.output, record.caption = str(target), caption_text(result, options)
    if claims:
        claims.store_record(target, record.line())
    try:
        write_atomic(target, record.caption, exclusive=exclusive)
    except FileExistsError:
        record.caption = target.read_text(encoding="utf-8")
    except OSError as exc:
        record.status, record.output, record.caption = "failed", None, None
        record.error = f"{target}: cannot write the caption ({exc})"
    return record


class Recorder:
    """Counts results into the summary, updates progress and appends --jsonl lines."""

    def __init__(self, plan: Plan, options: BatchOptions, progress: Progress):
        self.summary, self.progress = plan.summary, progress
        self.jsonl: IO[str] | None = open(options.jsonl, "a", encoding="utf-8") if options.jsonl else None  # noqa: SIM115
        self.parquet = options.parquet
        self.records: list[dict] = []
        self.earlier: set[str] | None = None  # --jsonl lines of earlier runs, read when first needed

    def add(self, record: Record, shown: bool = True) -> None:
        """Count `record`, show it (unless it was shown when planned), write it to --jsonl / --parquet."""
        if record.status == "captioned":
            self.summary.captioned += 1
        elif record.status == "clash":
            self.summary.clashes += 1
        else:
            self.summary.failed += 1
        if shown:
            self.progress.update(Path(record.path), f"{record.tokens} tokens", record.error)
        if self.jsonl:
            self._write(record.line(), once=not shown)
        if self.parquet:
            self.records.append(record.fields())

    def _write(self, line: str, once: bool) -> None:
        """Append a --jsonl line; with `once`, only if an earlier run has not (a name clash is recorded once,
        not on every re-run)."""
        assert self.jsonl is not None
        if once:
            if self.earlier is None:
                with open(self.jsonl.name, encoding="utf-8", errors="replace") as existing:
                    self.earlier = {row.rstrip("\n") for row in existing}
            if line in self.earlier:
                return
        append_line(self.jsonl, line)

    def close(self) -> None:
        """Close --jsonl; write --parquet (one row per image of this run, written at the end)."""
        self.progress.close()
        if self.jsonl:
            self.jsonl.close()
        if self.parquet and self.records:
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = list(dict.fromkeys(key for record in self.records for key in record))  # *_bytes in some only
            pq.write_table(pa.Table.from_pylist([{key: r.get(key) for key in columns} for r in self.records]),
                           self.parquet)


@contextmanager
def recording(plan: Plan, options: BatchOptions, started: float, quiet: bool = False) -> Iterator[Recorder]:
    """Record results for a run; Ctrl-C ends it cleanly (summary marked interrupted), outputs closed.

    The plan's early records (folder-as-caption failures, name clashes: shown when planned) are counted
    and recorded first.
    """
    progress = Progress(len(plan.todo), quiet)
    recorder = Recorder(plan, options, progress)
    try:
        for record in plan.early:
            recorder.add(record, shown=False)
        yield recorder
    except KeyboardInterrupt:
        plan.summary.interrupted = True
    finally:
        recorder.close()
        plan.summary.elapsed_s = time.perf_counter() - started


@dataclass
class Unit:
    """One image file to run through the model and the jobs (paths to it) whose captions it gives."""

    image: Path
    jobs: list[ImageJob]


def caption_files(captioner: Captioner, plan: Plan, options: BatchOptions, quiet: bool = False) -> Summary:
    """Caption the plan's images in this process, sharing the folder with any other run on it.

    Continuous batching: `--batch-size` slots, each refilled as soon as its caption ends; each caption
    file is written when its caption is done. Each path gets its caption file; the model runs once per
    distinct file (symbolic links to one image share its caption). Ctrl-C abandons the captions in flight
    and releases their claims.
    """
    started = time.perf_counter()
    units: dict[Path, Unit] = {}
    for job in plan.todo:
        units.setdefault(job.image.resolve(), Unit(job.image, [])).jobs.append(job)
    claims = Claims(options.jsonl)
    with recording(plan, options, started, quiet) as recorder:
        try:
            stream = caption_stream(captioner, claimed_units(list(units.values()), plan, claims, options, recorder),
                                    options)
            for unit, result in stream:
                for job in unit.jobs:
                    target = plan.targets[job]
                    recorder.add(publish(_for_path(result, job), target, options, claims=claims))
                    claims.release(target)
                plan.summary.occupancy = stream.occupancy
        finally:
            claims.release_all()
    return plan.summary


def _for_path(result: CaptionResult, job: ImageJob) -> CaptionResult:
    """The result as seen from one path to the image (a symbolic link names itself)."""
    if result.source == str(job.image):
        return result
    error = result.error.replace(result.source, str(job.image), 1) if result.error else None
    return dataclasses.replace(result, source=str(job.image), error=error)


def claimed_units(units: list[Unit], plan: Plan, claims: Claims, options: BatchOptions,
                  recorder: Recorder) -> Iterator[tuple[Unit, Path] | None]:
    """(unit, image) for each image this run claims, for a CaptionStream. Images other runs hold are put
    back and looked at again (every WAIT_FOR_OTHERS_S; None meanwhile, so the captions in flight go on)
    once this run's share is done: finished by their owner (counted as done by other runs) or, when the
    owner died, taken over. So when the last run on a folder ends, every image has been done once."""
    pending, waiting = deque(units), deque[Unit]()
    run_started = time.time()
    told, next_look = False, 0.0
    while pending or waiting:
        if not pending:
            if not told:
                recorder.progress.note(f"waiting for other runs to finish the {len(waiting)} image(s) they hold")
                told = True
            if time.monotonic() < next_look:
                yield None
                continue
            next_look = time.monotonic() + WAIT_FOR_OTHERS_S
            pending, waiting = waiting, pending
            continue
        unit = pending.popleft()
        mine, busy = [], []
        for job in unit.jobs:
            try:
                state = _claim(plan.targets[job], claims, options.overwrite, run_started)
            except OSError as exc:
                recorder.add(Record(str(job.image), "failed", error=f"{plan.targets[job]}: cannot claim it ({exc})"))
                continue
            if state == "mine":
                mine.append(job)
            elif state == "busy":
                busy.append(job)
            else:
                plan.summary.by_others += 1
                recorder.progress.update(job.image, "done by another run")
        if busy:
            waiting.append(Unit(unit.image, busy))
        if mine:
            yield Unit(unit.image, mine), unit.image


def _claim(target: Path, claims: Claims, overwrite: bool, run_started: float) -> str:
    """"mine" (claimed), "busy" (another live run holds it) or "done" (captioned meanwhile by another run;
    with --overwrite: a caption newer than this run's start)."""
    if not claims.claim(target):
        return "busy"
    try:
        done = target.is_file() and (not overwrite or target.stat().st_mtime >= run_started)
    except FileNotFoundError:
        done = False
    if done:
        claims.release(target)
        return "done"
    return "mine"

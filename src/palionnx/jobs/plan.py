"""Planning a captioning run before any model loads: where each caption goes, what is skipped, name
clashes, and what killed runs left behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .claims import CLAIM_SUFFIX, claim_path, recover_stale
from .files import ImageJob, caption_path, remove_stale_temp_files
from .options import CaptionOptions
from .progress import Progress, print_line
from .records import Record, Recorder, Summary


@dataclass
class Plan:
    """What a run will do: the images to caption, where each caption goes, and what was decided already
    (skips counted in the summary; failures and name clashes as records)."""

    todo: list[ImageJob]
    targets: dict[ImageJob, Path]
    summary: Summary
    early: list[Record] = field(default_factory=list)


def plan_run(jobs: list[ImageJob], options: CaptionOptions, quiet: bool = False) -> Plan:
    """Map images to caption files and decide, before any model is loaded, what to do with each.

    - A caption file that exists is skipped (or, with --existing overwrite / append / prepend, captioned
      again: see `captioning.publish`).
    - A caption path that is a folder is an error for that image.
    - Name clash (`a.gif` and `a.webp` both want `a.txt`): the first image in sorted order owns the
      caption file; the others are reported, counted and recorded as clashes, never captioned, and do not
      change the exit status (rename one of them to caption both).
    - Claims and temp files that killed runs left are cleared (see `palionnx.jobs.claims`).
    """
    summary = Summary()
    targets = {job: caption_path(job, options.ext, options.output_dir) for job in jobs}
    folders = {path.parent for path in targets.values()}
    remove_stale_temp_files(folders)
    _recover_claims(folders, set(targets.values()), keep_marks=options.adds)
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
        elif target.exists() and not options.recaptions:
            summary.skipped += 1
        else:
            todo.append(job)
        owner.setdefault(target, job.image)
    for record in early:
        print_line(f"{'warning' if record.status == 'clash' else 'error'}: {record.path}: {record.error}")
    if summary.skipped and not quiet:
        print_line(f"skipping {summary.skipped} images that already have a {options.ext} caption")
    return Plan(todo, targets, summary, early)


def _recover_claims(folders: set[Path], targets: set[Path], keep_marks: bool) -> None:
    """Finish what killed runs left: stale claims beside captions (their --jsonl records included; with
    `keep_marks`, the marks of --existing append / prepend stay). A claim's caption is known from its name, or
    for a shortened name (a long caption name) from this run's targets."""
    known = {claim_path(target): target for target in targets}
    for folder in folders:
        if folder.is_dir():
            for claim in folder.glob(f".*{CLAIM_SUFFIX}"):
                target = known.get(claim)
                if target is None and claim_path(claim.with_name(claim.name[1 : -len(CLAIM_SUFFIX)])) == claim:
                    target = claim.with_name(claim.name[1 : -len(CLAIM_SUFFIX)])
                if target is not None:
                    recover_stale(claim, target, keep_marks)


@contextmanager
def recording(plan: Plan, options: CaptionOptions, started: float, quiet: bool = False) -> Iterator[Recorder]:
    """Record results for a run; Ctrl-C ends it cleanly (summary marked interrupted), outputs closed.

    The plan's early records (folder-as-caption failures, name clashes: shown when planned) are counted
    and recorded first.
    """
    progress = Progress(len(plan.todo), quiet)
    recorder = Recorder(plan.summary, options, progress)
    try:
        for record in plan.early:
            recorder.add(record, shown=False)
        yield recorder
    except KeyboardInterrupt:
        plan.summary.interrupted = True
    finally:
        recorder.close()
        plan.summary.elapsed_s = time.perf_counter() - started

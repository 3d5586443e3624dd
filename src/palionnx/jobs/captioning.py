"""Captioning a planned run of image files: claimed images through continuous batching, each caption file
written atomically as its caption ends, records and progress as they come."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.captioner import Captioner, CaptionResult
from ..runtime.limits import RequestError
from ..runtime.preprocess import ImageInput
from ..runtime.stream import CaptionStream, Retry
from .checks import memory_limit
from .claims import Claims
from .cleanup import clean_caption, filter_tags, retry_text
from .files import ImageJob, write_atomic
from .options import CaptionOptions
from .plan import Plan, recording
from .records import Record, Recorder, Summary

WAIT_FOR_OTHERS_S = 0.5  # how often a run that has finished its share looks at images other runs hold


def fit_batch(captioner: Captioner, options: CaptionOptions, images: int,
              say: Callable[[str], None] | None = None) -> CaptionOptions:
    """The options with the batch this run captions at: --batch-size, or the device's default halved until
    its estimated memory fits what is free (or --max-memory). RequestError when the prompt or the context
    cannot work, or even that batch does not fit."""
    limit = memory_limit(captioner.device, options.max_memory_gb)

    def check(batch: int) -> None:
        captioner.check([options.prompt], options.max_new_tokens, min(batch, max(1, images)), limit)

    if options.batch_size is not None:
        check(options.batch_size)
        return options
    default = slots = captioner.default_batch_size
    while slots > 1:
        try:
            check(slots)
            break
        except RequestError:
            slots //= 2
    else:
        check(slots)  # batch 1: its error is the one to report
    if slots < default and say:
        say(f"batch {slots} (the default {default} needs more memory than is free)")
    return dataclasses.replace(options, batch_size=slots) if slots < default else options


def caption_body(text: str, options: CaptionOptions) -> str:
    """A raw caption as the caption file holds it, before the prefix and suffix: --clean, then the tag filters."""
    text = clean_caption(text, options.clean_style) if options.clean else text
    if options.filters_tags:
        text = filter_tags(text, options.exclude_tags, options.tag_underscores, options.max_tags)
    return text


def caption_text(result: CaptionResult, options: CaptionOptions) -> str:
    """The caption file's text: prefix, the caption (--clean applied), suffix."""
    return options.prefix + caption_body(result.text, options) + options.suffix


def retry_policy(options: CaptionOptions) -> Retry | None:
    """--min-words / --retry-words / --retries / --keep as a `Retry`, reading the caption as written (--clean
    applied, without the prefix and suffix) or, with the origin clean-up, the pruned raw caption as the origin
    script does (`cleanup.retry_text`)."""
    if not ((options.min_words or options.retry_words) and options.retries):
        return None
    style = options.clean_style if options.clean else None
    return Retry(options.min_words, options.retries, reads=lambda text: retry_text(text, style),
                 retry_words=options.retry_words, keep_last=options.keep == "last")


def caption_stream(captioner: Captioner, items: Iterable[tuple[Any, ImageInput] | None], options: CaptionOptions
                   ) -> CaptionStream:
    """A CaptionStream over `items` with the run's generation options, --min-words / --retries and
    --captions-per-image included (each image's captions are separate requests: see `per_image`)."""
    return CaptionStream(captioner, items, slots=options.batch_size, prompt=options.prompt,
                         max_new_tokens=options.max_new_tokens, sampler=options.sampler(),
                         logits_processors=options.logits_processors(), retry=retry_policy(options),
                         copies=options.captions_per_image)


def publish(results: list[CaptionResult], target: Path, options: CaptionOptions, exclusive: bool = False,
            claims: Claims | None = None) -> Record:
    """Write one image's caption file from its captions (one per line) and return its record; a failed
    caption fails the image and leaves its file as it was.

    With --existing append / prepend the captions join the file's text (`joined`). With `exclusive`, an
    existing caption file is left alone (a retried Ray task must not write twice). With `claims`, the record
    is stored in the image's claim first, so a kill right after the caption is written still gets its --jsonl
    line (see `palionnx.jobs.claims`).
    """
    failed = next((result for result in results if not result.ok), None)
    record = Record(path=str(results[0].source), status="failed" if failed else "captioned",
                    tokens=sum(len(result.tokens) for result in results), error=failed.error if failed else None,
                    attempts=sum(result.attempts for result in results), timings=_timings(results))
    if failed:
        return record
    captions = [caption_text(result, options) for result in results]
    try:
        text = joined(captions, target, options)
    except (OSError, UnicodeDecodeError) as exc:
        record.status, record.error = "failed", f"{target}: cannot read the existing caption ({exc})"
        return record
    record.output, record.caption = str(target), text
    if options.adds or len(captions) > 1:
        record.captions = captions
    if claims:
        claims.store_record(target, record.line(), text)
    try:
        write_atomic(target, text, exclusive=exclusive)
    except FileExistsError:
        record.caption = target.read_text(encoding="utf-8")
    except OSError as exc:
        record.status, record.output, record.caption, record.captions = "failed", None, None, None
        record.error = f"{target}: cannot write the caption ({exc})"
    return record


def joined(captions: list[str], target: Path, options: CaptionOptions) -> str:
    """The caption file's new text: the captions one per line, and with --existing append / prepend the text
    the file holds now (stripped) before / after them, joined by --separator (by a line break when there
    are several captions per image). A missing or empty file gets the captions alone."""
    new = "\n".join(captions)
    if not options.adds:
        return new
    try:
        with open(target, encoding="utf-8", newline="") as existing:  # as it is: no "\r" turned into "\n"
            old = existing.read().strip()
    except FileNotFoundError:
        old = ""
    if not old:
        return new
    separator = "\n" if len(captions) > 1 else options.separator
    return old + separator + new if options.existing == "append" else new + separator + old


def _timings(results: list[CaptionResult]) -> dict[str, float]:
    """An image's timings over its captions: vision and prefill summed, decode per token over them all."""
    decode_s = sum(result.timings.decode_s for result in results)
    steps = sum(result.timings.decode_steps for result in results)
    return {"vision_s": round(sum(result.timings.vision_s for result in results), 4),
            "prefill_s": round(sum(result.timings.prefill_s for result in results), 4),
            "decode_ms_per_token": round(1000 * decode_s / steps if steps else 0.0, 3)}


def per_image(stream: Iterable[tuple[Any, CaptionResult]], count: int
              ) -> Iterator[tuple[Any, list[CaptionResult]]]:
    """(tag, its `count` results) as each tag's last caption ends (--captions-per-image; the stream gives each
    tag `count` results, its copies carrying the same tag object)."""
    waiting: dict[int, list[CaptionResult]] = {}
    for tag, result in stream:
        results = waiting.setdefault(id(tag), [])
        results.append(result)
        if len(results) == count:
            del waiting[id(tag)]
            yield tag, results


@dataclass
class Unit:
    """One image file to run through the model and the jobs (paths to it) whose captions it gives."""

    image: Path
    jobs: list[ImageJob]


def caption_files(captioner: Captioner, plan: Plan, options: CaptionOptions, quiet: bool = False) -> Summary:
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
    claims = Claims(options.jsonl, marks=options.adds)
    with recording(plan, options, started, quiet) as recorder:
        try:
            stream = caption_stream(captioner, claimed_units(list(units.values()), plan, claims, options, recorder),
                                    options)
            for unit, results in per_image(stream, options.captions_per_image):
                for job in unit.jobs:
                    target = plan.targets[job]
                    recorder.add(publish([_for_path(result, job) for result in results], target, options,
                                         claims=claims))
                    claims.release(target)
                plan.summary.occupancy = stream.occupancy
            claims.clear_marks()  # every image done (a Ctrl-C leaves the marks for the re-run)
        finally:
            claims.release_all()
    return plan.summary


def _for_path(result: CaptionResult, job: ImageJob) -> CaptionResult:
    """The result as seen from one path to the image (a symbolic link names itself)."""
    if result.source == str(job.image):
        return result
    error = result.error.replace(result.source, str(job.image), 1) if result.error else None
    return dataclasses.replace(result, source=str(job.image), error=error)


def claimed_units(units: list[Unit], plan: Plan, claims: Claims, options: CaptionOptions,
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
                state = _claim(plan.targets[job], claims, options.recaptions, run_started)
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


def _claim(target: Path, claims: Claims, recaptions: bool, run_started: float) -> str:
    """"mine" (claimed), "busy" (another live run holds it) or "done" (captioned meanwhile by another run;
    when recaptioning: a caption newer than this run's start, or, appending, one a run marked done)."""
    if not claims.claim(target):
        return "done" if claims.done_by_mark(target) else "busy"
    try:
        done = target.is_file() and (not recaptions or target.stat().st_mtime >= run_started)
    except FileNotFoundError:
        done = False
    if done:
        claims.release(target)
        return "done"
    return "mine"

"""`CaptionStream`: a dataset's images through a `Scheduler` (images decoded ahead on threads, unreadable ones
reported in place, short captions retried), and `Retry`, the rule for captioning an image again."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from .captioner import Captioner, CaptionResult, Timings, source_name
from .defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from .generate import LogitsProcessor, Sampler, greedy
from .preprocess import ImageInput, ImageLoadError
from .request import Request
from .scheduler import Scheduler

_END: Any = object()  # the end of a source (None means "nothing ready yet")


def word_count(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class Retry:
    """Caption an image again while its caption, as `reads` gives it (default: as it is), has fewer than
    `min_words` words or holds one of `retry_words`, at most `retries` more times. Kept: the caption with the
    most words (the first among equals), or with `keep_last` the last one made."""

    min_words: int
    retries: int
    reads: Callable[[str], str] = str
    retry_words: tuple[str, ...] = ()
    keep_last: bool = False

    def unfit(self, text: str) -> bool:
        """Whether a caption calls for another attempt."""
        read = self.reads(text)
        return word_count(read) < self.min_words or any(word in read for word in self.retry_words)

    def again(self, result: CaptionResult) -> bool:
        """Whether `result` (after `result.attempts` captions) is unfit and may be captioned again."""
        return result.ok and result.attempts <= self.retries and self.unfit(result.text)

    def better(self, best: CaptionResult, latest: CaptionResult) -> CaptionResult:
        """The caption to keep of the best so far and the latest one, counting both attempts."""
        longer = latest.ok and word_count(self.reads(latest.text)) > word_count(self.reads(best.text))
        keep = latest if latest.ok and (self.keep_last or longer) else best
        return dataclasses.replace(keep, attempts=latest.attempts)


@dataclass
class _Ticket:
    """A CaptionStream request's tag: the caller's tag, the image's name and the captions so far."""

    tag: Any
    source: str
    attempts: int = 1
    best: CaptionResult | None = None


class CaptionStream:
    """Captions (tag, image) pairs through a Scheduler; iterate for (tag, CaptionResult) as captions end.

    Images are decoded a few slots ahead on the captioner's threads; an unreadable one comes back at once
    as a result with `error` set. `items` may yield None for "nothing ready yet" (see `Scheduler.run`).
    With `retry`, a short caption goes back to the scheduler as a new request for the same pixels, and the
    image's result comes once it is long enough or out of retries (`CaptionResult.attempts` counts them).
    With `copies`, each image is captioned that many times, each caption a request of its own (with
    sampling they differ), and gives that many results with its tag. `occupancy` says how full the slots
    were so far.
    """

    def __init__(self, captioner: Captioner, items: Iterable[tuple[Any, ImageInput] | None], *,
                 slots: int | None = None,
                 prompt: str = DEFAULT_PROMPT, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 sampler: Sampler | None = None, logits_processors: Sequence[LogitsProcessor] | None = None,
                 ignore_eos: bool = False, retry: Retry | None = None, copies: int = 1):
        self.captioner, self.items, self.retry, self.copies = captioner, items, retry, copies
        self.slots = slots or captioner.default_batch_size
        self.template = Request(np.empty(0), prompt, max_new_tokens, sampler or greedy, logits_processors or (),
                                ignore_eos)
        prompt_tokens = len(captioner.text.prompt_ids(prompt))
        self.scheduler = Scheduler(captioner.model, captioner.text, self.slots, prompt_tokens + max_new_tokens)
        self._failed: deque[tuple[Any, CaptionResult]] = deque()

    @property
    def occupancy(self) -> float:
        return self.scheduler.occupancy.ratio(self.slots)

    def __iter__(self) -> Iterator[tuple[Any, CaptionResult]]:
        for completion in self.scheduler.run(self._requests()):
            yield from self._drain_failed()
            ticket: _Ticket = completion.request.tag
            timings = Timings(vision_s=completion.vision_s, prefill_s=completion.prefill_s,
                              decode_s=completion.decode_s, decode_steps=completion.steps)
            error = f"{ticket.source}: {completion.error}" if completion.error else None
            result = CaptionResult(ticket.source, completion.text, completion.tokens, error, timings, ticket.attempts)
            if self.retry is None:
                yield ticket.tag, result
                continue
            if ticket.best is not None:
                result = self.retry.better(ticket.best, result)
            if self.retry.again(result):
                again = _Ticket(ticket.tag, ticket.source, ticket.attempts + 1, result)
                self.scheduler.submit(dataclasses.replace(completion.request, tag=again))
            else:
                yield ticket.tag, result
        yield from self._drain_failed()

    def _drain_failed(self) -> Iterator[tuple[Any, CaptionResult]]:
        while self._failed:
            yield self._failed.popleft()

    def _requests(self) -> Iterator[Request | None]:
        pool = self.captioner.image_threads()
        ahead: deque[tuple[Any, ImageInput, Future]] = deque()
        items = iter(self.items)
        exhausted = False
        while True:
            while not exhausted and len(ahead) < 2 * self.slots:
                item = next(items, _END)
                if item is _END:
                    exhausted = True
                elif item is None:  # the source has nothing ready now
                    break
                else:
                    tag, image = item
                    ahead.append((tag, image, pool.submit(self.captioner.load_pixels, image)))
            if not ahead:
                if exhausted:
                    return
                yield None
                continue
            tag, image, future = ahead.popleft()
            pixels = future.result()
            if isinstance(pixels, ImageLoadError):
                failed = CaptionResult(source_name(image), error=str(pixels))
                self._failed.extend([(tag, failed)] * self.copies)
                continue
            for _ in range(self.copies):
                yield dataclasses.replace(self.template, pixels=pixels, tag=_Ticket(tag, source_name(image)))

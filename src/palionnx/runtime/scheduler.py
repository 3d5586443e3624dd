"""Continuous batching: a fixed number of KV-cache rows (slots), refilled as soon as a caption ends.

A static batch keeps decoding until its longest caption ends, its finished rows idle. Here every
decode step runs all slots at once, and a slot whose caption ended (eos or its limit) takes the next
waiting image: its vision encoding and prefill run (batched with the other newcomers) into that slot's
cache rows, then it joins the running steps. Each slot keeps its own length, sampler and processors, so
a caption is the same whatever it shares the batch with: greedy output equals captioning the image alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .captioner import Captioner, CaptionResult, Timings, source_name
from .defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from .generate import LogitsProcessor, Sampler, greedy, reads_logits
from .model import DecoderState, StepOutput
from .preprocess import ImageInput, ImageLoadError


@dataclass
class Request:
    """One image to caption and how."""

    pixels: np.ndarray  # [3, H, W] float32, from preprocess.image_pixels
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampler: Sampler = greedy
    logits_processors: Sequence[LogitsProcessor] = ()
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    tag: Any = None  # the caller's handle, given back with the completion


@dataclass
class Completion:
    """A finished caption."""

    request: Request
    tokens: list[int]  # generated ids, the stop token excluded
    text: str
    vision_s: float  # image encoding of the admission that brought it in (shared with the other newcomers)
    prefill_s: float  # prefill of that admission
    decode_s: float  # wall time from its first decode step to its last
    steps: int  # decode steps it took part in
    error: str | None = None  # the model failed while it was in flight (onnxruntime error, out of memory)


@dataclass
class _Slot:
    request: Request
    history: np.ndarray  # prompt ids then generated ids: what its processors see
    admitted: float
    vision_s: float
    prefill_s: float
    tokens: list[int] = field(default_factory=list)


@dataclass
class Occupancy:
    """How full the slots were: busy slot-steps / (steps x slots)."""

    steps: int = 0
    busy: int = 0

    def ratio(self, slots: int) -> float:
        return self.busy / (self.steps * slots) if self.steps else 0.0


def word_count(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class Retry:
    """Caption an image again while its caption is short: fewer than `min_words` words (as `words` counts
    them), at most `retries` more times. The caption with the most words is kept (the first among equals)."""

    min_words: int
    retries: int
    words: Callable[[str], int] = word_count

    def again(self, result: CaptionResult) -> bool:
        """Whether `result` (after `result.attempts` captions) is short and may be captioned again."""
        return result.ok and result.attempts <= self.retries and self.words(result.text) < self.min_words

    def better(self, best: CaptionResult, latest: CaptionResult) -> CaptionResult:
        """The caption to keep of the best so far and the latest one, counting both attempts."""
        keep = latest if latest.ok and self.words(latest.text) > self.words(best.text) else best
        return dataclasses.replace(keep, attempts=latest.attempts)


@dataclass
class _Ticket:
    """A CaptionStream request's tag: the caller's tag, the image's name and the captions so far."""

    tag: Any
    source: str
    attempts: int = 1
    best: CaptionResult | None = None


IDLE_S = 0.2  # how long run() waits when nothing is in flight and the source has nothing ready
_END: Any = object()  # the end of a source (None means "nothing ready yet")


class Scheduler:
    """Captions a stream of requests over `slots` KV-cache rows of `max_len` tokens each."""

    def __init__(self, captioner: Captioner, slots: int, max_len: int):
        self.captioner, self.slots, self.max_len = captioner, slots, max_len
        self.state: DecoderState = captioner.model.new_state(slots, max_len)
        self.state.lengths[:] = 0
        self.rows: list[_Slot | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self.occupancy = Occupancy()
        self.eos = set(captioner.manifest.eos_token_ids)
        self._tokens = np.zeros(slots, dtype=np.int64)  # each slot's next input token
        self._admitting: list[Request] = []

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.captioner.text.prompt_ids(prompt))

    @property
    def busy(self) -> int:
        return sum(slot is not None for slot in self.rows)

    def submit(self, request: Request) -> None:
        """Queue a request; ValueError if its prompt and caption cannot fit a slot."""
        needed = self.prompt_tokens(request.prompt) + request.max_new_tokens
        if needed > self.max_len:
            raise ValueError(f"prompt + max_new_tokens = {needed} tokens exceed a slot's {self.max_len}")
        self.waiting.append(request)

    def drop(self, unwanted: Callable[[Request], bool]) -> int:
        """Forget waiting and running requests for which `unwanted(request)` is true (their callers gave up);
        their slots free at once. Returns how many were dropped."""
        before = len(self.waiting)
        self.waiting = deque(r for r in self.waiting if not unwanted(r))
        dropped = before - len(self.waiting)
        for row, slot in enumerate(self.rows):
            if slot is not None and unwanted(slot.request):
                self.rows[row] = None
                dropped += 1
        return dropped

    def run(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        """Caption `requests` (pulled lazily, as slots free up) and yield each completion when it ends.

        The source may yield None for "nothing ready yet" (images other processes hold, say): decoding goes
        on, and the source is asked again after the next step (or after IDLE_S when nothing is in flight).
        """
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(self.waiting) < self.slots - self.busy:
                request = next(source, _END)
                if request is _END:
                    exhausted = True
                elif request is None:
                    break
                else:
                    self.submit(request)
            if not self.waiting and not self.busy:
                if exhausted:
                    return
                time.sleep(IDLE_S)
                continue
            yield from self.step()

    def step(self) -> list[Completion]:
        """Admit waiting requests into free slots, then run one decode step; returns what finished. If the
        model fails (an onnxruntime error, out of memory), the captions in flight end with that error and
        the scheduler goes on with the next ones."""
        try:
            done = self._admit()
            active = np.array([slot is not None for slot in self.rows])
            if not active.any():
                return done
            output = self.state.step(self._tokens, active)
        except Exception as exc:  # noqa: BLE001 - reported per caption; the others go on
            return self._fail_in_flight(exc)
        self.occupancy.steps += 1
        self.occupancy.busy += int(active.sum())
        return done + self._advance(output, np.flatnonzero(active))

    def _fail_in_flight(self, exc: Exception) -> list[Completion]:
        error = f"captioning failed ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
        failed = [Completion(request, [], "", 0.0, 0.0, 0.0, 0, error) for request in self._admitting]
        self._admitting = []
        for row, slot in enumerate(self.rows):
            if slot is not None:
                failed.append(dataclasses.replace(self._retire(row, slot), error=error))
        return failed

    def _admit(self) -> list[Completion]:
        """Vision + prefill for as many waiting requests as there are free slots (runs of neighbouring free
        slots prefill together); their first tokens are sampled from the prefill's logits."""
        free = [row for row, slot in enumerate(self.rows) if slot is None]
        newcomers = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        self._admitting = newcomers  # until they have slots, so that a failure can still answer them
        if not newcomers:
            return []
        started = time.perf_counter()
        prompt = self.captioner.prompt_batch(np.stack([r.pixels for r in newcomers]), [r.prompt for r in newcomers])
        vision = time.perf_counter() - started
        rows = free[: len(newcomers)]
        first = 0
        output: StepOutput | None = None
        while first < len(rows):  # runs of consecutive free rows
            stop = first + 1
            while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            output = self.state.prefill_rows(prompt, first, stop, into=rows[first])
            first = stop
        prefill = time.perf_counter() - started - vision
        for i, (row, request) in enumerate(zip(rows, newcomers)):
            history = prompt.input_ids[i, : prompt.lengths[i]].copy()
            history[history < 0] = self.captioner.manifest.image_token_id  # as transformers sees the prompt
            self.rows[row] = _Slot(request, history, time.perf_counter(), vision, prefill)
        self._admitting = []
        assert output is not None
        return self._advance(output, np.array(rows))

    def _advance(self, output: StepOutput, rows: np.ndarray) -> list[Completion]:
        """Pick each row's next token, retire the rows that finished."""
        slots = [self.rows[row] for row in rows]
        need_logits = any(reads_logits(s.request.sampler, s.request.logits_processors) for s in slots if s)
        logits = output.logits() if need_logits else None
        greedy_tokens = output.next_token()
        done = []
        for row, slot in zip(rows.tolist(), slots):
            assert slot is not None
            request = slot.request
            if logits is not None and reads_logits(request.sampler, request.logits_processors):
                scores = logits[row : row + 1]
                for process in request.logits_processors:
                    scores = process(slot.history[None], scores)
                token = int(request.sampler(scores)[0])
            else:
                token = int(greedy_tokens[row])
            finished = token in self.eos and not request.ignore_eos
            if not finished:
                slot.tokens.append(token)
            if finished or len(slot.tokens) >= request.max_new_tokens:
                done.append(self._retire(row, slot))
            else:
                if request.logits_processors:  # only they read the history
                    slot.history = np.append(slot.history, token)
                self._tokens[row] = token
        return done

    def _retire(self, row: int, slot: _Slot) -> Completion:
        self.rows[row] = None
        self._tokens[row] = 0
        return Completion(slot.request, slot.tokens, self.captioner.text.decode(slot.tokens), slot.vision_s,
                          slot.prefill_s, time.perf_counter() - slot.admitted, len(slot.tokens))


class CaptionStream:
    """Captions (tag, image) pairs through a Scheduler; iterate for (tag, CaptionResult) as captions end.

    Images are decoded a few slots ahead on the captioner's threads; an unreadable one comes back at once
    as a result with `error` set. `items` may yield None for "nothing ready yet" (see `Scheduler.run`).
    With `retry`, a short caption goes back to the scheduler as a new request for the same pixels, and the
    image's result comes once it is long enough or out of retries (`CaptionResult.attempts` counts them).
    `occupancy` says how full the slots were so far.
    """

    def __init__(self, captioner: Captioner, items: Iterable[tuple[Any, ImageInput] | None], *,
                 slots: int | None = None,
                 prompt: str = DEFAULT_PROMPT, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 sampler: Sampler | None = None, logits_processors: Sequence[LogitsProcessor] | None = None,
                 ignore_eos: bool = False, retry: Retry | None = None):
        self.captioner, self.items, self.retry = captioner, items, retry
        self.slots = slots or captioner.default_batch_size
        self.template = Request(np.empty(0), prompt, max_new_tokens, sampler or greedy, logits_processors or (),
                                ignore_eos)
        prompt_tokens = len(captioner.text.prompt_ids(prompt))
        self.scheduler = Scheduler(captioner, self.slots, prompt_tokens + max_new_tokens)
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
                self._failed.append((tag, CaptionResult(source_name(image), error=str(pixels))))
                continue
            yield dataclasses.replace(self.template, pixels=pixels, tag=_Ticket(tag, source_name(image)))

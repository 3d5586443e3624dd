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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .admission import Prefiller
from .generate import next_tokens
from .limits import RequestError, check_request
from .model import DecoderState, OnnxPaliGemma, StepOutput
from .request import Completion, Request
from .text import TextCodec


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


IDLE_S = 0.2  # how long run() waits when nothing is in flight and the source has nothing ready
_END: Any = object()  # the end of a source (None means "nothing ready yet")


class Scheduler:
    """Captions a stream of requests over `slots` KV-cache rows of `max_len` tokens each, with `model`'s
    graphs and `text`'s tokenizer.

    With `overlap` (CPU models), newcomers are prefilled in batches on a thread beside the decode steps
    (`admission.Prefiller`) and join between two steps, instead of all decoding slots waiting for their vision
    encoding and prefill: steadier tokens for the captions in flight (the server streams them); the default
    admits newcomers inside the step (`palionnx caption`)."""

    def __init__(self, model: OnnxPaliGemma, text: TextCodec, slots: int, max_len: int, overlap: bool = False):
        self.model, self.text, self.slots, self.max_len = model, text, slots, max_len
        self.state: DecoderState = model.new_state(slots, max_len)
        if overlap and model.device != "cpu":
            raise ValueError("overlapped admission needs a CPU model (caches in host memory)")
        self.prefiller = Prefiller(model, text, slots, max_len) if overlap else None
        self._unwanted: set[int] = set()  # ids of requests dropped while the prefiller had them: not admitted
        self.rows: list[_Slot | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self.occupancy = Occupancy()
        self.eos = set(model.manifest.eos_token_ids)
        self._tokens = np.zeros(slots, dtype=np.int64)  # each slot's next input token
        self._admitting: list[Request] = []

    @property
    def busy(self) -> int:
        """Slots holding a caption in flight."""
        return sum(slot is not None for slot in self.rows)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot (the one being prefilled beside the steps among them)."""
        return len(self.waiting) + (len(self.prefiller.requests) if self.prefiller is not None else 0)

    def check(self, request: Request) -> None:
        """RequestError (a ValueError) if the request cannot be captioned here: its prompt (special-token
        text, the model's context; `limits.check_request`) or prompt + caption longer than a slot."""
        prompt_tokens = check_request(self.model.manifest, self.text, [request.prompt], request.max_new_tokens, 1)
        needed = prompt_tokens + request.max_new_tokens
        if needed > self.max_len:
            raise RequestError(f"prompt + max_new_tokens = {needed} tokens exceed a slot's {self.max_len}")

    def submit(self, request: Request) -> None:
        """Queue a request; RequestError (see `check`) if it cannot be captioned here."""
        self.check(request)
        self.queue(request)

    def queue(self, request: Request) -> None:
        """Queue a request that has already passed `check` (the server checks on the request's own thread)."""
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
        for request in self.prefiller.requests if self.prefiller is not None else []:
            if unwanted(request) and id(request) not in self._unwanted:
                self._unwanted.add(id(request))
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
            while not exhausted and self.queued < self.slots - self.busy:
                request = next(source, _END)
                if request is _END:
                    exhausted = True
                elif request is None:
                    break
                else:
                    self.submit(request)
            if not self.queued and not self.busy:  # queued: the requests being prefilled beside the steps too
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
            done = self._admit() if self.prefiller is None else self._admit_overlapped(self.prefiller)
            active = np.array([slot is not None for slot in self.rows])
            if not active.any():
                if self.prefiller is not None and not self.prefiller.idle:
                    self.prefiller.wait(IDLE_S)  # nothing decodes: wait for the prefill rather than spin
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
        prompt = self.model.prompt_batch(np.stack([r.pixels for r in newcomers]),
                                         [self.text.prompt_ids(r.prompt) for r in newcomers])
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
            self.rows[row] = _Slot(request, prompt.history(i), time.perf_counter(), vision, prefill)
        self._admitting = []
        assert output is not None
        return self._advance(output, np.array(rows))

    def _admit_overlapped(self, prefiller: Prefiller) -> list[Completion]:
        """Overlapped admission: newcomers whose prefill has ended take free slots (their cache rows copied in,
        their first tokens chosen), and, when the prefiller is free, the waiting requests start theirs."""
        done: list[Completion] = []
        free = [row for row, slot in enumerate(self.rows) if slot is None]
        rows: list[int] = []
        out_rows: list[int] = []
        output: StepOutput | None = None
        for staged in prefiller.take(len(free)):
            if id(staged.request) in self._unwanted:
                self._unwanted.discard(id(staged.request))
            elif staged.error is not None:
                done.append(Completion(staged.request, [], "", 0.0, 0.0, 0.0, 0, staged.error))
            else:
                assert staged.output is not None and staged.history is not None
                row = free[len(rows)]
                self.state.copy_row(prefiller.state, staged.row, row)
                self.rows[row] = _Slot(staged.request, staged.history, time.perf_counter(), staged.vision_s,
                                       staged.prefill_s)
                rows.append(row)
                out_rows.append(staged.row)
                output = staged.output
        if output is not None:
            done += self._advance(output, np.array(rows), output_rows=np.array(out_rows))
        if prefiller.idle and self.waiting:
            prefiller.start([self.waiting.popleft() for _ in range(min(len(self.waiting), self.slots))])
        return done

    def _advance(self, output: StepOutput, rows: np.ndarray, output_rows: np.ndarray | None = None) -> list[Completion]:
        """Pick each row's next token (with its own sampler and processors) from the outputs' row of the same
        index (or `output_rows`'), and retire the rows that finished."""
        done = []
        for row, out in zip(rows.tolist(), (rows if output_rows is None else output_rows).tolist()):
            slot = self.rows[row]
            assert slot is not None
            request = slot.request
            token = int(next_tokens(output.rows(slice(out, out + 1)), slot.history[None], request.sampler,
                                    request.logits_processors)[0])
            finished = token in self.eos and not request.ignore_eos
            if not finished:
                slot.tokens.append(token)
                if request.on_token is not None:
                    request.on_token(token)
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
        return Completion(slot.request, slot.tokens, self.text.decode(slot.tokens), slot.vision_s,
                          slot.prefill_s, time.perf_counter() - slot.admitted, len(slot.tokens))

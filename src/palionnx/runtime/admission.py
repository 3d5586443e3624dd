"""Admission beside the decode steps: newcomers' vision encoding and prefill run on a thread of their own, as
one batch into a staging cache, and the scheduler moves each finished row into a free slot between two decode
steps (`DecoderState.copy_row`). The slots already decoding go on meanwhile instead of stopping for the whole
prefill: what a streaming client sees as a steady flow of tokens. CPU folders only (their caches are host
memory).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .model import DecoderState, OnnxPaliGemma, StepOutput
from .request import Request
from .text import TextCodec


@dataclass
class Staged:
    """A newcomer whose prompt is in row `row` of the staging cache, or the reason it could not be."""

    request: Request
    row: int
    history: np.ndarray | None  # its prompt ids (what its processors see)
    output: StepOutput | None  # the prefill's outputs: its first token is chosen from its row
    vision_s: float = 0.0
    prefill_s: float = 0.0
    error: str | None = None


class Prefiller:
    """Prefills a batch of up to `slots` requests at a time on a thread, into a state of its own."""

    def __init__(self, model: OnnxPaliGemma, text: TextCodec, slots: int, max_len: int):
        self.model, self.text, self.slots = model, text, slots
        self.state: DecoderState = model.new_state(slots, max_len)
        self.requests: list[Request] = []  # being prefilled, or staged and not all taken yet
        self._staged: deque[Staged] = deque()
        self._done = threading.Event()

    @property
    def idle(self) -> bool:
        return not self.requests

    def start(self, requests: list[Request]) -> None:
        """Begin the vision encoding and prefill of `requests` (only when idle; at most `slots` of them)."""
        assert self.idle and 0 < len(requests) <= self.slots
        self.requests = list(requests)
        self._staged.clear()
        self._done.clear()
        threading.Thread(target=self._prefill, args=(self.requests,), name="palionnx-prefill", daemon=True).start()

    def _prefill(self, requests: list[Request]) -> None:
        started = time.perf_counter()
        try:
            prompt = self.model.prompt_batch(np.stack([r.pixels for r in requests]),
                                             [self.text.prompt_ids(r.prompt) for r in requests])
            vision = time.perf_counter() - started
            self.state.reset()
            output = self.state.prefill_rows(prompt, 0, len(requests))
            prefill = time.perf_counter() - started - vision
            staged = [Staged(r, i, prompt.history(i), output, vision, prefill) for i, r in enumerate(requests)]
        except Exception as exc:  # noqa: BLE001 - reported with each request; the scheduler goes on
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            staged = [Staged(r, i, None, None, error=f"captioning failed ({reason})") for i, r in enumerate(requests)]
        self._staged.extend(staged)
        self._done.set()

    def wait(self, seconds: float) -> None:
        """Wait up to `seconds` for the prefill in hand to end."""
        self._done.wait(seconds)

    def take(self, count: int) -> list[Staged]:
        """Up to `count` staged requests once their prefill has ended; the caller copies their rows out before
        anything else starts here (the prefiller is idle again when all are taken)."""
        if self.idle or not self._done.is_set():
            return []
        taken = [self._staged.popleft() for _ in range(min(count, len(self._staged)))]
        gone = {id(staged.request) for staged in taken}
        self.requests = [r for r in self.requests if id(r) not in gone]
        return taken

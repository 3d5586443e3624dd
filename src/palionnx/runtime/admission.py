"""Admission beside the decode steps: a newcomer's vision encoding and prefill run on a thread of their own, into
a one-row staging cache, and the scheduler moves the finished row into a free slot between two decode steps
(`DecoderState.copy_row`). The slots already decoding go on meanwhile instead of stopping for the whole prefill:
what a streaming client sees as a steady flow of tokens. CPU folders only (their caches are host memory).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from .model import DecoderState, OnnxPaliGemma, StepOutput
from .request import Request
from .text import TextCodec


@dataclass
class Staged:
    """A newcomer whose prompt is in the staging cache's row 0, or the reason it could not be."""

    request: Request
    history: np.ndarray | None  # its prompt ids (what its processors see)
    output: StepOutput | None  # the prefill's outputs: its first token is chosen from them
    vision_s: float = 0.0
    prefill_s: float = 0.0
    error: str | None = None


class Prefiller:
    """Prefills one request at a time on a thread into a one-row state of its own."""

    def __init__(self, model: OnnxPaliGemma, text: TextCodec, max_len: int):
        self.model, self.text = model, text
        self.state: DecoderState = model.new_state(1, max_len)
        self.request: Request | None = None  # being prefilled, or staged and not yet taken
        self._ready: Staged | None = None
        self._done = threading.Event()

    @property
    def idle(self) -> bool:
        return self.request is None

    def start(self, request: Request) -> None:
        """Begin `request`'s vision encoding and prefill (only when idle)."""
        assert self.idle
        self.request, self._ready = request, None
        self._done.clear()
        threading.Thread(target=self._prefill, args=(request,), name="palionnx-prefill", daemon=True).start()

    def _prefill(self, request: Request) -> None:
        started = time.perf_counter()
        try:
            prompt = self.model.prompt_batch(request.pixels[None], [self.text.prompt_ids(request.prompt)])
            vision = time.perf_counter() - started
            self.state.reset()
            output = self.state.prefill(prompt)
            self._ready = Staged(request, prompt.history(0), output, vision, time.perf_counter() - started - vision)
        except Exception as exc:  # noqa: BLE001 - reported with the request; the scheduler goes on
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._ready = Staged(request, None, None, error=f"captioning failed ({reason})")
        self._done.set()

    def wait(self, seconds: float) -> None:
        """Wait up to `seconds` for the prefill in hand to end."""
        self._done.wait(seconds)

    def take(self) -> Staged | None:
        """The staged request once its prefill has ended (the staging row is then free for the next one, after
        the caller has copied it out)."""
        if self.request is None or not self._done.is_set():
            return None
        staged, self.request, self._ready = self._ready, None, None
        return staged

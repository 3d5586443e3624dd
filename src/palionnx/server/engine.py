"""The captioning engine behind the HTTP server: one thread runs the Scheduler; requests from any thread
wait on futures. Concurrent requests share decode steps (continuous batching)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from ..runtime.captioner import Captioner
from ..runtime.limits import RequestError
from ..runtime.request import Completion, Request
from ..runtime.scheduler import Scheduler
from .metrics import Metrics


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


class Rejected(ValueError):
    """The request cannot be served (e.g. its prompt and caption do not fit a slot)."""


@dataclass
class Submitted:
    """What the engine keeps of a request: its future."""

    future: Future[Completion]


class Engine:
    """Runs `Scheduler.step` on a thread of its own while requests are queued or running."""

    def __init__(self, captioner: Captioner, slots: int, max_len: int, max_queue: int, metrics: Metrics,
                 overlap: bool = False):
        self.captioner, self.max_queue, self.metrics = captioner, max_queue, metrics
        # overlap (CPU): newcomers are prefilled beside the decode steps, so that streams flow while others join
        self.scheduler = Scheduler(captioner.model, captioner.text, slots, max_len, overlap=overlap)
        self.inbox: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.cancelled = threading.Event()  # set when a caller gave up: the next step drops such requests
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="palionnx-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> Future[Completion]:
        """Queue a request (thread-safe); QueueFull when the queue is at --max-queue, Rejected when it cannot
        fit a slot."""
        try:  # checked here, so a bad prompt never reaches a step
            self.scheduler.check(request)
        except RequestError as exc:
            raise Rejected(str(exc)) from None
        future: Future[Completion] = Future()
        future.add_done_callback(self._note_cancelled)
        request.tag = Submitted(future)
        request.on_token = self._timed(request.on_token)
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.inbox) + self.scheduler.queued >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self.inbox.append(request)
            self.metrics.queue.set(self.queue_depth)
        self.wake.set()
        return future

    def _timed(self, on_token: Callable[[int], None] | None) -> Callable[[int], None]:
        """`on_token` (if any) with the time between this caption's tokens recorded (inter-token latency)."""
        last: list[float] = []

        def token(value: int) -> None:
            now = time.perf_counter()
            if last:
                self.metrics.record_gap(now - last[0])
            last[:] = [now]
            if on_token is not None:
                on_token(value)

        return token

    @property
    def queue_depth(self) -> int:
        return len(self.inbox) + self.scheduler.queued

    def _note_cancelled(self, future: Future[Completion]) -> None:
        if future.cancelled():
            self.cancelled.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is queued and running, then end the thread."""
        with self.lock:
            self.stopping = True
        self.wake.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with self.lock:
                while self.inbox:
                    scheduler.queue(self.inbox.popleft())  # checked in `submit`
                idle = not scheduler.queued and not scheduler.busy
                if idle and self.stopping:
                    return
            if idle:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            if self.cancelled.is_set():  # only then scan the queue and the slots
                self.cancelled.clear()
                scheduler.drop(lambda request: request.tag.future.cancelled())
            for completion in scheduler.step():  # a failed step fails the captions in it, not the server
                self.metrics.record_tokens(len(completion.tokens))
                with contextlib.suppress(InvalidStateError):  # its caller gave up (timeout) meanwhile
                    if completion.error:
                        completion.request.tag.future.set_exception(RuntimeError(completion.error))
                    else:
                        completion.request.tag.future.set_result(completion)
            self.metrics.record_slots(scheduler.busy, scheduler.slots, scheduler.occupancy.steps,
                                      scheduler.occupancy.busy)
            self.metrics.queue.set(self.queue_depth)

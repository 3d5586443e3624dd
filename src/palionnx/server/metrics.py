"""Server metrics through `prometheus_client`: requests by route and outcome, request latency and inter-token
latency histograms, queue depth, slot use and generated tokens. Each `Metrics` has a registry of its own."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds, of a whole request
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds between two tokens
TOKEN_WINDOW_S = 30.0  # tokens/s over the last 30 s
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Thread-safe series, rendered by `text()` for GET /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("palionnx_requests", "Requests by route and outcome.", ["route", "outcome"],
                                registry=registry)
        self.latency = Histogram("palionnx_request_seconds", "Latency of successful caption requests.",
                                 buckets=BUCKETS, registry=registry)
        self.token_gaps = Histogram("palionnx_inter_token_seconds", "Time between two tokens of one caption, "
                                    "as the scheduler produces them.", buckets=TOKEN_GAP_BUCKETS, registry=registry)
        self.queue = Gauge("palionnx_queue_depth", "Requests waiting for a slot.", registry=registry)
        self.slots = Gauge("palionnx_slots", "KV-cache slots (the decode batch).", registry=registry)
        self.busy = Gauge("palionnx_slots_busy", "Slots captioning now.", registry=registry)
        self.occupancy = Gauge("palionnx_slot_occupancy", "Mean busy slots / slots over all decode steps so far.",
                               registry=registry)
        Gauge("palionnx_tokens_per_second", f"Generated tokens per second over the last {TOKEN_WINDOW_S:.0f} s.",
              registry=registry).set_function(self.tokens_per_s)
        self.steps = Counter("palionnx_decode_steps", "Decode steps run.", registry=registry)
        self.busy_steps = Counter("palionnx_busy_slot_steps", "Busy slots summed over decode steps (occupancy over "
                                  "an interval = its increase / (the steps' increase x slots)).", registry=registry)
        self.tokens = Counter("palionnx_generated_tokens", "Tokens generated.", registry=registry)
        self.generated = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent completions
        self._steps_seen = self._busy_seen = 0

    def record_request(self, route: str, outcome: str, seconds: float) -> None:
        self.requests.labels(route, outcome).inc()
        if outcome == "ok":
            self.latency.observe(seconds)

    def record_gap(self, seconds: float) -> None:
        """Time between two consecutive tokens of one caption."""
        self.token_gaps.observe(seconds)

    def record_tokens(self, count: int) -> None:
        self.tokens.inc(count)
        with self.lock:
            self.generated += count
            self.recent.append((time.monotonic(), count))
            self._forget_old()

    def _forget_old(self) -> None:
        """Drop completions older than the window (here, not only when /metrics is read: unscraped, the window
        would keep every completion ever)."""
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - TOKEN_WINDOW_S:
            self.recent.popleft()

    def record_slots(self, busy: int, slots: int, steps: int, busy_steps: int) -> None:
        """The scheduler's slots now and its running totals of steps and busy slot-steps."""
        self.busy.set(busy)
        self.slots.set(slots)
        self.occupancy.set(busy_steps / (steps * slots) if steps else 0.0)
        with self.lock:
            self.steps.inc(steps - self._steps_seen)
            self.busy_steps.inc(busy_steps - self._busy_seen)
            self._steps_seen, self._busy_seen = steps, busy_steps

    def tokens_per_s(self) -> float:
        with self.lock:
            self._forget_old()
            return sum(count for _, count in self.recent) / TOKEN_WINDOW_S

    def text(self) -> bytes:
        """Every series in Prometheus' text format."""
        return generate_latest(self.registry)

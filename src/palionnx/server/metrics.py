"""Server metrics in Prometheus' text format: requests by route and outcome, latency histogram, queue depth,
slot use and generated tokens."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
TOKEN_WINDOW_S = 30.0  # tokens/s over the last 30 s


class Metrics:
    """Thread-safe counters, rendered by `text()` for GET /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (route, outcome)
        self.latency = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.generated = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent completions
        self.busy = self.slots = 0
        self.occupancy = 0.0
        self.steps = self.busy_steps = 0  # decode steps, and busy slots summed over them

    def record_request(self, route: str, outcome: str, seconds: float) -> None:
        with self.lock:
            self.requests[route, outcome] += 1
            if outcome == "ok":
                self.latency_sum += seconds
                self.latency_count += 1
                for i, bound in enumerate(BUCKETS):
                    if seconds <= bound:
                        self.latency[i] += 1

    def record_tokens(self, count: int) -> None:
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
        with self.lock:
            self.busy, self.slots, self.steps, self.busy_steps = busy, slots, steps, busy_steps
            self.occupancy = busy_steps / (steps * slots) if steps else 0.0

    def tokens_per_s(self) -> float:
        self._forget_old()
        return sum(count for _, count in self.recent) / TOKEN_WINDOW_S

    def text(self, queue_depth: int) -> str:
        with self.lock:
            lines = ["# HELP palionnx_requests_total Requests by route and outcome.",
                     "# TYPE palionnx_requests_total counter"]
            lines += [f'palionnx_requests_total{{route="{route}",outcome="{outcome}"}} {n}'
                      for (route, outcome), n in sorted(self.requests.items())]
            lines += ["# HELP palionnx_request_seconds Latency of successful caption requests.",
                      "# TYPE palionnx_request_seconds histogram"]
            lines += [f'palionnx_request_seconds_bucket{{le="{bound}"}} {n}' for bound, n in zip(BUCKETS, self.latency)]
            lines += [f'palionnx_request_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                      f"palionnx_request_seconds_sum {self.latency_sum:.6f}",
                      f"palionnx_request_seconds_count {self.latency_count}"]
            gauges = [("queue_depth", "Requests waiting for a slot.", queue_depth),
                      ("slots", "KV-cache slots (the decode batch).", self.slots),
                      ("slots_busy", "Slots captioning now.", self.busy),
                      ("slot_occupancy", "Mean busy slots / slots over all decode steps so far.", self.occupancy),
                      ("tokens_per_second", f"Generated tokens per second over the last {TOKEN_WINDOW_S:.0f} s.",
                       self.tokens_per_s())]
            for name, help_text, value in gauges:
                lines += [f"# HELP palionnx_{name} {help_text}", f"# TYPE palionnx_{name} gauge",
                          f"palionnx_{name} {value:g}"]
            counters = [("decode_steps_total", "Decode steps run.", self.steps),
                         ("busy_slot_steps_total", "Busy slots summed over decode steps (occupancy over an interval "
                          "= its increase / (the steps' increase x slots)).", self.busy_steps),
                         ("generated_tokens_total", "Tokens generated.", self.generated)]
            for name, help_text, value in counters:
                lines += [f"# HELP palionnx_{name} {help_text}", f"# TYPE palionnx_{name} counter",
                          f"palionnx_{name} {value}"]
            return "\n".join(lines) + "\n"

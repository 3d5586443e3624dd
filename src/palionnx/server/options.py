"""`ServeOptions`: the settings of `palionnx serve`, declared once (the CLI's options take their defaults here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.defaults import DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class ServeOptions:
    """`palionnx serve` settings (see its --help)."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: int | None = None  # None: DEFAULT_SERVE_CPU_SLOTS on the CPU, the device's default batch size elsewhere
    device: str = "auto"
    max_queue: int = 256  # requests waiting for a slot; more get 503
    timeout_s: float = 120.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the longest caption a request may ask for, and the default
    max_body_mb: float = 20.0
    cuda_graph: bool = True

"""What the scheduler is asked and what it answers: a `Request` (one image to caption, and how) and its
`Completion`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from .generate import LogitsProcessor, Sampler, greedy


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
    on_token: Callable[[int], None] | None = None  # called on the scheduler's thread with each caption token


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

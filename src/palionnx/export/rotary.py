"""Gemma's rotary position tables in numpy (the decoder graph's cos / sin inputs), so building a decoder needs
no torch: the original RoPE, as transformers' `GemmaRotaryEmbedding` / `Gemma2RotaryEmbedding` compute it for
`rope_type` "default" (tests/test_export.py checks the two agree within float32 rounding)."""

from __future__ import annotations

from typing import Any

import numpy as np


def rope_theta(text_config: Any) -> float | None:
    """The base of a text config's default RoPE; None for another rope_type (not computed here)."""
    parameters = getattr(text_config, "rope_parameters", None) or {}
    if parameters.get("rope_type", "default") != "default":
        return None
    theta = parameters.get("rope_theta", getattr(text_config, "rope_theta", None))
    return float(theta) if theta is not None else None


def rotary_tables(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim / 2] float32 for positions 1 .. positions (PaliGemma counts from 1)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # theta ** e rounded once to float32 (float32 pow differs between libraries by an ulp, which the angles of
    # late positions multiply), then divided in float32, as transformers does
    inverse = np.float32(1.0) / (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    angles = np.arange(1, positions + 1, dtype=np.float32)[:, None] * inverse[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

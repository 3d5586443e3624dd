"""Telling a hub model id ("owner/name") from a local path: one rule for `export` and `caption --model`."""

from __future__ import annotations

from pathlib import Path


def is_hub_id(text: str) -> bool:
    """True for "owner/name" that is not a local path: exactly one "/", not starting with ".", "/" or "~",
    and nothing of that name on disk."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()

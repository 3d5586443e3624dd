"""Named sets of caption settings: `caption --preset NAME` (cli/presets.py) and the web page's presets."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "origin": {  # the origin script's (inference.py of mnemic/paligemma-longprompt-v1): at most 10 attempts, the
        # last kept, its retry rule read on the pruned caption and its clean-up (jobs/cleanup.py)
        "temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.15, "no_repeat_ngram_size": 2,
        "max_new_tokens": 256, "min_words": 20, "retry_words": "no_parallel", "retries": 9, "keep": "last",
        "clean": True, "clean_style": "origin",
    },
}
SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens")


def sampling_presets() -> dict[str, dict[str, Any]]:
    """Each preset's generation settings only (what one request can carry)."""
    return {name: {k: v for k, v in values.items() if k in SAMPLING} for name, values in PRESETS.items()}

"""`palionnx caption --preset NAME`: a named set of caption settings (`jobs/presets.py`), applied as the
options' defaults.

`origin` reproduces the project's origin script (`inference.py` of mnemic/paligemma-longprompt-v1): sampling at
temperature 0.7, top-k 50, top-p 0.9, repetition penalty 1.15, no repeated 2-grams, 256 new tokens, caption
again while the caption has fewer than 20 words (at most 10 more times), and its clean-up (`--clean`).
Options given on the command line still win over a preset's values.
"""

from __future__ import annotations

import typer

from ..jobs.presets import PRESETS


def apply_preset(ctx: typer.Context, name: str | None) -> str | None:
    """Callback of the eager --preset option: the preset's values become the defaults of the options that
    are processed after it, so an option given explicitly keeps its value."""
    if name is None:
        return None
    if name not in PRESETS:
        raise typer.BadParameter(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    ctx.default_map = {**(ctx.default_map or {}), **PRESETS[name]}
    return name

"""`--model`: an exported folder, or a hub checkpoint exported on first use into a cache folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..hub import is_hub_id
from ..runtime.contract import MANIFEST_NAME
from ..runtime.levels import LevelError, resolve_quant, target_device

DEFAULT_MODEL = "mnemic/paligemma-longprompt-v1-safetensors"
ALTERNATIVE_MODEL = "gokaygokay/paligemma-rich-captions"


class ModelResolveError(Exception):
    """--model cannot be turned into a model folder; the message says what to pass instead."""


def cache_root() -> Path:
    """$PALIONNX_CACHE, else $XDG_CACHE_HOME/palionnx, else ~/.cache/palionnx."""
    if os.environ.get("PALIONNX_CACHE"):
        return Path(os.environ["PALIONNX_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "palionnx"


def cached_folder(hub_id: str, quant: str) -> Path:
    """Where the export of `hub_id` at `quant` lives in the cache."""
    return cache_root() / "models" / hub_id.replace("/", "--") / quant


def resolve_model(model: str, quant: str, device: str, progress: Callable[[str], None]) -> Path:
    """Return a model folder for `model`, exporting a hub checkpoint into the cache the first time, at `quant`
    ("auto": fp16 where CUDA runs, else int4) built for `device`."""
    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            raise ModelResolveError(
                f"{model} is a transformers checkpoint, not an exported model: run "
                f"`palionnx export {model} -o {model}-{quant} --quant {quant}` and pass that folder"
            )
        raise ModelResolveError(f"{model} is not a palionnx model folder (no {MANIFEST_NAME})")
    if not is_hub_id(model):
        raise ModelResolveError(f"{model}: no such model folder (give an exported folder or a hub id)")

    try:
        quant = resolve_quant(quant, device)
        target = target_device(quant, device)
    except LevelError as exc:
        raise ModelResolveError(str(exc)) from None
    folder = cached_folder(model, quant if target == "cpu" or quant == "fp16" else f"{quant}-{target}")
    if (folder / MANIFEST_NAME).is_file():
        return folder
    try:
        from ..export.checkpoint import CheckpointError
        from ..export.convert import ExportError, export
    except ImportError as exc:
        raise ModelResolveError(
            f"{model} is not exported yet and exporting needs the export extra "
            f"(pip install 'palionnx[export]'), or pass --model with an exported folder ({exc.name} missing)"
        ) from None
    progress(f"exporting {model} at {quant} into {folder} (first use only)")
    try:
        export(model, folder, quant=quant, device=target, progress=progress)
    except (CheckpointError, ExportError) as exc:
        raise ModelResolveError(
            f"{exc}\nNothing is cached for {model}: pass --model with a model folder made by "
            "`palionnx export` (or a local checkpoint exported with it), or run once with network access."
        ) from None
    return folder

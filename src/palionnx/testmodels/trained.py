"""The trained test checkpoints `shapes-pg1` and `shapes-pg2`: recipes, cache, and building them.

    folder = trained_checkpoint("shapes-pg1", cache_dir)    # trains on first use, then reuses

A checkpoint is cached under `cache_dir/NAME-KEY`, KEY being a hash of its recipe, of the code that makes it
(scenes, tokenizer, training) and of the torch and transformers versions: a machine trains each one once, and
changing any of these trains it again. All of a recipe's numbers live in RECIPES.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from . import scenes, synth, train
from .synth import Geometry
from .train import Progress, Recipe

_VISION: synth.Shapes = dict(image_size=96, patch_size=32, vision_hidden=128, vision_intermediate=512,
                             vision_layers=2, vision_heads=4)
_DECODER: synth.Shapes = dict(hidden=256, intermediate=512, layers=4, heads=4, head_dim=64, text_vocab=1024)
_TRAINING: dict[str, Any] = dict(vision_steps=150, steps=1000, batch_size=32, lr=2e-3, vision_lr=3e-3, warmup=20,
                                 scenes=8192)
RECIPES: dict[str, Recipe] = {  # measured: see the README's "Trained test models"
    "shapes-pg1": Recipe(geometry=Geometry("pg1", **_VISION, **_DECODER, kv_heads=1), **_TRAINING),
    "shapes-pg2": Recipe(geometry=Geometry("pg2", **_VISION, **_DECODER, kv_heads=2, sliding_window=48), **_TRAINING),
}


def code_key(name: str) -> str:
    """Hash of the recipe of `name` and of the code that makes it (scenes, tokenizer, training): needs
    neither torch nor transformers, so a cached export of the checkpoint can be found without them."""
    return _code_digest(name).hexdigest()[:12]


def cache_key(name: str) -> str:
    """`code_key` with the torch and transformers versions: the key of the trained checkpoint itself.
    Raises PackageNotFoundError when torch or transformers is missing."""
    digest = _code_digest(name)
    digest.update(f"torch {version('torch')} transformers {version('transformers')}".encode())
    return digest.hexdigest()[:12]


def _code_digest(name: str) -> hashlib._Hash:
    digest = hashlib.sha256(repr(RECIPES[name]).encode())
    for module in (scenes, synth, train):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest


def tokenizer_for(geometry: Geometry) -> Tokenizer:
    """The scenes' tokenizer: PaliGemma's layout with every grammar word as one piece."""
    return synth.build_tokenizer(geometry, scenes.vocabulary(), scenes.first_words())


def trained_checkpoint(name: str, cache_dir: Path, progress: Progress | None = None) -> Path:
    """The folder of the trained checkpoint `name` under `cache_dir`, training it first if it is not there."""
    folder = Path(cache_dir) / f"{name}-{cache_key(name)}"
    if (folder / "config.json").is_file():
        return folder
    recipe = RECIPES[name]
    if progress:
        progress(f"training {name} into {folder} (first use only)")
    tokenizer = tokenizer_for(recipe.geometry)
    model = train.train(recipe, tokenizer, progress)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    synth.save_checkpoint(model, recipe.geometry, tokenizer, staging)
    try:
        staging.rename(folder)  # a complete folder or none, even with two processes training at once
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder

"""`--model`: an exported folder, a pre-exported hub repository, or a hub checkpoint exported on first use.

- A path (see `palionnx.hub.looks_like_path`) must be a model folder: "no model folder at X" otherwise.
- `OWNER/NAME` whose repository holds `palionnx.json` (at its root, or in a folder per quant level such as
  `int4/`) is downloaded as it is into the hub cache: only the chosen level's files, no torch, no export.
- Any other `OWNER/NAME` is a checkpoint, exported once into the palionnx cache (needs the export extra).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from ..hub import HubError, cached_snapshot, download, is_hub_id, repo_files
from ..runtime.contract import MANIFEST_NAME
from ..runtime.levels import LevelError, resolve_quant, target_device
from ..system import memory
from .export_plan import ExportEstimate, checkpoint_estimate, free_disk, read_config, shortfall
from .tables import human_bytes

DEFAULT_MODEL = "mnemic/paligemma-longprompt-v1-safetensors"
DEFAULT_QUANT = "int4"
LEVEL_PREFERENCE = ("int4", "int8", "fp16", "bf16", "fp32")  # a hub repository's level when --quant is not given
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]

Say = Callable[[str], None]


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


def resolve_model(model: str, quant: str | None, device: str, progress: Say) -> Path:
    """Return a model folder for `model` (see the module docstring). `quant` None or "auto" means: for an
    export, fp16 where CUDA runs and int4 on the CPU, built for `device`; for a pre-exported repository, the
    preferred level it offers."""
    if not is_hub_id(model):
        return local_folder(model)
    try:
        level = resolve_quant(quant or "auto", device)
        target = target_device(level, device)
    except LevelError as exc:
        raise ModelResolveError(str(exc)) from None
    cached = cached_folder(model, cache_key(level, target))
    if (cached / MANIFEST_NAME).is_file():
        return cached
    try:
        files, offline = repo_files(model)
        folder = hub_export(model, files, offline, None if quant in (None, "auto") else quant, progress)
        if folder is not None:
            return folder
        return first_use_export(model, files, offline, level, target, progress)
    except HubError as exc:
        raise ModelResolveError(f"{exc} (as a local path: no model folder at {model})") from None


def cache_key(level: str, target: str) -> str:
    """The cache folder's name for an export: the level, with "-cuda" for int8/int4 built for CUDA."""
    return f"{level}-{target}" if level in ("int8", "int4") and target != "cpu" else level


def local_folder(model: str) -> Path:
    """`model` as a path: it must be an exported model folder."""
    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file():
        raise ModelResolveError(
            f"{model} is a transformers checkpoint, not an exported model: run `palionnx export {model} "
            f"-o {str(path).rstrip('/')}-{DEFAULT_QUANT} --quant {DEFAULT_QUANT}` and pass that folder"
        )
    if path.is_dir():
        raise ModelResolveError(f"{model} is not a palionnx model folder (no {MANIFEST_NAME})")
    if path.exists():
        raise ModelResolveError(f"{model} is a file: --model takes the folder that holds {MANIFEST_NAME}")
    raise ModelResolveError(f"no model folder at {model} (--model takes an exported folder or a hub id owner/name)")


def hub_export(repo: str, files: dict[str, int | None], offline: bool, quant: str | None, progress: Say) -> Path | None:
    """The local folder of a pre-exported palionnx model in `repo`, downloaded if needed; None when the
    repository holds no palionnx.json (a checkpoint)."""
    levels = sorted(name.split("/")[0] for name in files if name.count("/") == 1 and name.endswith("/" + MANIFEST_NAME))
    if MANIFEST_NAME in files:
        subfolder, patterns = "", [name for name in files if "/" not in name]
    elif levels:
        subfolder = quant or next((level for level in LEVEL_PREFERENCE if level in levels), levels[0])
        if subfolder not in levels:
            raise ModelResolveError(f"{repo} holds exports at {', '.join(levels)}, not {subfolder}: "
                                    "pass --quant with one of those")
        patterns = [f"{subfolder}/*"]
    else:
        return None
    size = sum(s or 0 for name, s in files.items() if any(fnmatch(name, p) for p in patterns))
    where = f"{repo}/{subfolder}" if subfolder else repo
    if not offline:
        progress(f"downloading the pre-exported model {where} ({human_bytes(size)}) into the hub cache")
    folder = download(repo, patterns, offline) / subfolder
    if not (folder / MANIFEST_NAME).is_file():
        raise ModelResolveError(f"{where} is incomplete in the hub cache: run once with network access")
    return folder


def first_use_export(repo: str, files: dict[str, int | None], offline: bool, quant: str, target: str,
                     progress: Say) -> Path:
    """Export the checkpoint `repo` at `quant` for `target` into the cache, after saying what it costs and
    checking that this machine has the RAM and disk for it."""
    try:
        from ..export.checkpoint import CheckpointError
        from ..export.convert import ExportError, export
        from ..export.output import OutputError
    except ImportError as exc:
        raise ModelResolveError(
            f"{repo} is a checkpoint, not a pre-exported model, and exporting it needs the export extra "
            f"(pip install 'palionnx[export]'), or pass --model with an exported folder ({exc.name} missing)"
        ) from None
    folder = cached_folder(repo, cache_key(quant, target))
    available = memory()
    plan = export_estimate(repo, files, offline, quant, available.total if available else None)
    progress(f"first use of {repo}: exporting it once at {quant} into {folder}")
    progress(f"needs: {plan.describe()}")
    problem = shortfall(plan, available.available if available else None, free_disk(cache_root()),
                        available.total if available else None)
    if problem:
        raise ModelResolveError(
            f"cannot export {repo} on this machine: {problem}. Export it elsewhere (palionnx export {repo} -o FOLDER "
            f"--quant {quant}), copy FOLDER here and pass --model FOLDER; or pick a pre-exported model"
        )
    try:
        export(repo, folder, quant=quant, device=target, progress=progress)
    except (CheckpointError, ExportError, OutputError) as exc:
        raise ModelResolveError(f"{exc}\nNothing is cached for {repo}: pass --model with a model folder made by "
                                "`palionnx export`, or run once with network access.") from None
    return folder


def export_estimate(repo: str, files: dict[str, int | None], offline: bool, quant: str,
                    total_ram: float | None = None) -> ExportEstimate:
    """Download size, time, RAM and disk of exporting `repo` (its config.json is fetched for the dtype)."""
    config = read_config(download(repo, ["config.json"], offline) / "config.json")
    wanted = {name: size for name, size in files.items() if any(fnmatch(name, p) for p in CHECKPOINT_PATTERNS)}
    try:
        snapshot: Path | None = cached_snapshot(repo)
    except HubError:
        snapshot = None
    missing = sum(size or 0 for name, size in wanted.items() if snapshot is None or not (snapshot / name).is_file())
    return checkpoint_estimate(files, config, quant, 0 if offline else missing, total_ram)


@dataclass(frozen=True)
class CachedModel:
    """One model folder on this machine that `--model OWNER/NAME` would use."""

    model: str  # the hub id
    level: str
    folder: Path
    size: int  # bytes
    made: float  # when it was written (seconds since the epoch)
    origin: str  # "exported" (palionnx cache) or "downloaded" (hub cache)


def cached_models() -> list[CachedModel]:
    """Exports in the palionnx cache and pre-exported models in the hub cache."""
    found = []
    for manifest in sorted((cache_root() / "models").glob(f"*/*/{MANIFEST_NAME}")):
        folder = manifest.parent
        found.append(_cached(folder.parent.name.replace("--", "/", 1), folder.name, folder, "exported"))
    for repo, snapshot in _hub_snapshots():
        for manifest in sorted([snapshot / MANIFEST_NAME, *snapshot.glob(f"*/{MANIFEST_NAME}")]):
            if manifest.is_file():
                found.append(_cached(repo, _level(manifest), manifest.parent, "downloaded"))
    return found


def _cached(model: str, level: str, folder: Path, origin: str) -> CachedModel:
    files = [p for p in folder.iterdir() if p.is_file()]
    return CachedModel(model, level, folder, sum(p.stat().st_size for p in files),
                       (folder / MANIFEST_NAME).stat().st_mtime, origin)


def _level(manifest: Path) -> str:
    try:
        return str(json.loads(manifest.read_text())["quant"]["level"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _hub_snapshots() -> list[tuple[str, Path]]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except (CacheNotFound, OSError):
        return []
    return [(repo.repo_id, Path(revision.snapshot_path)) for repo in cache.repos if repo.repo_type == "model"
            for revision in repo.revisions]


def remove_cached(model: str, quant: str | None) -> list[CachedModel]:
    """Remove `model`'s exports from the palionnx cache (only the `quant` level when given) and, without
    `quant`, its pre-exported download from the hub cache (the hub cache keeps a repository's levels
    together). Returns what was removed."""
    import shutil

    from huggingface_hub import scan_cache_dir

    removed = [m for m in cached_models()
               if m.model == model and (quant is None or (m.origin == "exported" and m.level.split("-")[0] == quant))]
    for entry in removed:
        if entry.origin == "exported":
            shutil.rmtree(entry.folder)
    hub = [m for m in removed if m.origin == "downloaded"]
    if hub:
        cache = scan_cache_dir()
        hashes = [rev.commit_hash for repo in cache.repos if repo.repo_id == model for rev in repo.revisions]
        cache.delete_revisions(*hashes).execute()
    for leftover in [cache_root() / "models" / model.replace("/", "--")]:
        if leftover.is_dir() and not any(leftover.iterdir()):
            leftover.rmdir()
    return removed


def age(made: float) -> str:
    """'3 days ago'-style text for `palionnx models`."""
    seconds = max(0.0, time.time() - made)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"

"""`palionnx caption`'s checks before any model is loaded: options that contradict each other, outputs
that cannot be written, and the memory a request may use. Each failure is one CheckError sentence."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..runtime.generate import SettingError, check_settings
from ..system import memory, nvidia_gpus
from .cleanup import STYLES, UNDERSCORES
from .options import EXISTING, CaptionOptions
from .plan import Plan

GB = 1e9


class CheckError(Exception):
    """An option or output that cannot work; the message says which and why."""


def check_options(options: CaptionOptions) -> None:
    """A captioning job's options that contradict each other or cannot work, before anything is read."""
    if options.ext not in (".txt", ".caption"):
        raise CheckError(f"--ext must be .txt or .caption, got {options.ext!r}")
    check_sampling(options.temperature, options.top_k, options.top_p, options.seed, options.repetition_penalty,
                   options.no_repeat_ngram_size)
    if options.clean_style not in STYLES:
        raise CheckError(f"--clean-style must be {' or '.join(STYLES)}, got {options.clean_style!r}")
    if options.tag_underscores not in UNDERSCORES:
        raise CheckError(f"--tag-underscores must be {', '.join(UNDERSCORES)}, got {options.tag_underscores!r}")
    if options.keep not in ("longest", "last"):
        raise CheckError(f"--keep must be longest or last, got {options.keep!r}")
    check_retries(options.min_words or bool(options.retry_words), options.retries, options.temperature)
    if options.existing not in EXISTING:
        raise CheckError(f"--existing must be {', '.join(EXISTING)}, got {options.existing!r}")
    if options.captions_per_image < 1:
        raise CheckError(f"--captions-per-image must be at least 1, got {options.captions_per_image}")
    if options.captions_per_image > 1 and options.temperature <= 0:
        raise CheckError("--captions-per-image needs sampling (--temperature above 0, e.g. 0.7): greedy decoding "
                         "gives the same caption every time")


def check_sampling(temperature: float, top_k: int, top_p: float, seed: int | None, repetition_penalty: float,
                   no_repeat_ngram_size: int = 0) -> None:
    """The generation options, checked as the server checks its fields (`runtime.generate.check_settings`):
    finite and in range, and sampling options only with --temperature > 0 (refused, not ignored)."""
    try:
        check_settings(temperature, top_k, top_p, seed, repetition_penalty, no_repeat_ngram_size,
                       spell=lambda name: "--" + name.replace("_", "-"))
    except SettingError as exc:
        raise CheckError(str(exc)) from None


def check_retries(min_words: int, retries: int, temperature: float) -> None:
    """--min-words (or --retry-words) and --retries act together, and only when sampling (greedy gives the same
    caption again)."""
    if bool(min_words) != bool(retries):
        given, missing = ("--min-words", "--retries") if min_words else ("--retries", "--min-words")
        raise CheckError(f"{given} only acts with {missing} (e.g. --min-words 20 --retries 10; --retry-words "
                         "counts as --min-words)")
    if min_words and temperature <= 0:
        raise CheckError("--min-words and --retries need sampling (--temperature above 0, e.g. 0.7): greedy "
                         "decoding gives the same caption every time")


def check_outputs(options: CaptionOptions, plan: Plan) -> None:
    """--jsonl, --parquet, --output-dir and the folders captions go into must be writable, now."""
    if options.jsonl:
        _check_file("--jsonl", options.jsonl, append=True)
    if options.parquet:
        _check_file("--parquet", options.parquet, append=False)
    if options.output_dir:
        if options.output_dir.exists() and not options.output_dir.is_dir():
            raise CheckError(f"--output-dir {options.output_dir} is a file, not a folder")
        _check_folder(options.output_dir, "--output-dir")
        return
    for folder in sorted({plan.targets[job].parent for job in plan.todo}):
        _check_folder(folder, "captions go beside the images, but the folder", hint=": use --output-dir")


def _check_file(option: str, path: Path, append: bool) -> None:
    if path.is_dir():
        raise CheckError(f"{option} {path} is a folder: give a file path")
    if not path.parent.is_dir():
        raise CheckError(f"{option} {path}: the folder {path.parent} does not exist")
    if append and path.exists():
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise CheckError(f"cannot write {option} {path} ({exc.strerror or exc})") from None
        return
    _check_folder(path.parent, f"cannot write {option} {path}: the folder")


def _check_folder(folder: Path, what: str, hint: str = "") -> None:
    """Create and delete a probe file in `folder` (or, if it does not exist yet, its nearest parent)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        handle, probe = tempfile.mkstemp(prefix=".palionnx-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise CheckError(f"{what} {existing} is not writable ({exc.strerror or exc}){hint}") from None


def memory_limit(device: str, max_memory_gb: float | None) -> float | None:
    """Bytes a caption request may use beyond the loaded model: --max-memory, else what is free now on the
    device (RAM on the CPU, the GPU's free memory on CUDA); None when unknown (then no memory check)."""
    if max_memory_gb is not None:
        return max_memory_gb * GB
    if device == "cuda":
        gpus = nvidia_gpus()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(visible) if visible.isdigit() else 0
        return gpus[index].memory_free_mb * 2**20 if index < len(gpus) else None
    ram = memory()
    return float(ram.available) if ram and ram.available is not None else None


def tag_list(value: str) -> tuple[str, ...]:
    """--exclude-tags: tags separated by commas, or @FILE for a file of them (commas or one per line)."""
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            value = path.read_text(encoding="utf-8").replace("\n", ",")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckError(f"--exclude-tags {path}: cannot read the tag file "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
    return tuple(tag.strip() for tag in value.split(",") if tag.strip())

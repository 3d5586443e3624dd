"""Open a PaliGemma checkpoint (local folder or hub id) and read its settings through transformers.

AutoConfig / AutoProcessor read both older checkpoints (`preprocessor_config.json`, `tokenizer.model`
only) and newer ones (`processor_config.json`, `tokenizer.json`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hub import is_hub_id

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


class CheckpointError(Exception):
    """The checkpoint cannot be found, downloaded or read; the message says what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint and the settings the runtime needs from it."""

    model: Any  # PaliGemmaForConditionalGeneration, eager attention (None when not loaded)
    folder: Path  # the local checkpoint folder (the hub snapshot for a hub id)
    config: Any
    tokenizer: Any
    source_id: str
    revision: str | None
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float
    resample: str
    image_seq_length: int
    bos_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int


def resolve_source(source: str | Path) -> tuple[Path, str, str | None]:
    """A local folder as it is; a hub id downloaded (or found in the hub cache) with huggingface_hub.

    Returns (folder, source id, revision). Offline with nothing cached: a CheckpointError in one line.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path, str(source), None
    text = str(source)
    if not is_hub_id(text):
        raise CheckpointError(f"{source}: no such checkpoint folder (give a folder or a hub id like owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(text, allow_patterns=_WEIGHT_PATTERNS))
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"{text}: no such model on the hub (or it is private: log in first)") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"cannot download {text}: the hub is unreachable and it is not in the local cache "
            f"({type(exc).__name__}). Pass a local checkpoint folder instead."
        ) from exc
    return folder, text, folder.name  # snapshot folders are named by commit hash


def load_paligemma(folder: str | Path, dtype: str = "float32") -> Any:
    """The transformers model of a local checkpoint folder in `dtype`, eager attention, in eval mode: what
    export traces and what every comparison with transformers (validation, tests, benchmarks) runs."""
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


def open_checkpoint(source: str | Path, dtype: str = "float32", load_model: bool = True) -> Checkpoint:
    """Read the processor settings and, with `load_model`, the model (in `dtype`, eager attention)."""
    from transformers import AutoConfig, AutoProcessor, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, source_id, revision = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a readable PaliGemma checkpoint ({exc})") from exc
    if config.model_type != "paligemma":
        raise CheckpointError(f"{source}: model_type is {config.model_type!r}, palionnx exports 'paligemma' only")
    model = load_paligemma(folder, dtype) if load_model else None

    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    size = image_processor.size
    height = size["height"] if isinstance(size, dict) else size.height
    try:
        generation = GenerationConfig.from_pretrained(folder)
        eos = generation.eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = config.text_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    return Checkpoint(
        model=model,
        folder=folder,
        config=config,
        tokenizer=tokenizer,
        source_id=source_id,
        revision=revision,
        image_size=int(height),
        image_mean=[float(x) for x in image_processor.image_mean],
        image_std=[float(x) for x in image_processor.image_std],
        rescale_factor=float(image_processor.rescale_factor),
        resample=_RESAMPLE_NAMES[int(image_processor.resample)],
        image_seq_length=int(processor.image_seq_length),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_ids=[int(e) for e in eos_ids],
        pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
    )

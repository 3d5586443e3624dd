"""The settings of a captioning job, declared once: `palionnx caption`'s options take their defaults here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..runtime.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from ..runtime.generate import LogitsProcessor, Sampler, make_logits_processors, make_sampler

EXISTING = ("skip", "overwrite", "append", "prepend")  # what `--existing` may say


@dataclass(frozen=True)
class RayOptions:
    """`caption --ray`: where the cluster is and how many actors it runs (see the Ray panel of --help)."""

    address: str = "local"  # "local" (Ray on this machine), "auto" (the running cluster) or an address
    workers: int = 1  # captioning actors, one model each
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class CaptionOptions:
    """What a captioning job does with each image (see `palionnx caption --help`)."""

    # input and output
    ext: str = ".txt"
    output_dir: Path | None = None
    existing: str = "skip"  # an image whose caption file exists: one of EXISTING
    separator: str = ", "  # with existing append / prepend: between the old text and the new caption
    captions_per_image: int = 1  # with sampling: this many captions per image, one per line of its file
    jsonl: Path | None = None
    parquet: Path | None = None
    prefix: str = ""
    suffix: str = ""
    clean: bool = False
    clean_style: str = "basic"  # with clean: "basic" or "origin" (cleanup.py)
    exclude_tags: tuple[str, ...] = ()  # tag filters of the caption's leading tags (cleanup.filter_tags) ...
    tag_underscores: str = "keep"  # ... "keep", "spaces" or "drop" ...
    max_tags: int = 0  # ... at most this many (0: all); any of them also drops duplicate tags
    recursive: bool = True
    # generation
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_words: int = 0  # caption again (sampling) while the caption has fewer words than this ...
    retry_words: tuple[str, ...] = ()  # ... or while it holds one of these (the origin's "no_parallel") ...
    retries: int = 0  # ... at most this many more times
    keep: str = "longest"  # of an image's attempts: "longest" (most words) or "last" (as the origin script)
    # performance
    batch_size: int | None = None  # None: the device's default (Captioner.default_batch_size), halved to fit
    max_memory_gb: float | None = None  # None: what is free on the device once the model has loaded
    cuda_graph: bool = True

    @property
    def recaptions(self) -> bool:
        """Whether images that have a caption file are captioned again (anything but --existing skip)."""
        return self.existing != "skip"

    @property
    def adds(self) -> bool:
        """Whether the new caption joins the existing text (--existing append / prepend)."""
        return self.existing in ("append", "prepend")

    @property
    def filters_tags(self) -> bool:
        """Whether a tag filter is asked for (then duplicate tags go too)."""
        return bool(self.exclude_tags or self.tag_underscores != "keep" or self.max_tags)

    def sampler(self) -> Sampler:
        """A fresh sampler for these settings (greedy at temperature 0; seeded where --seed is given)."""
        return make_sampler(self.temperature, self.top_k, self.top_p, self.seed)

    def logits_processors(self) -> list[LogitsProcessor]:
        return make_logits_processors(self.repetition_penalty, self.no_repeat_ngram_size)

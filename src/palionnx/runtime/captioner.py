"""`Captioner`: the public API. Loads a model folder and captions images in batches."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from .generate import LogitsProcessor, PromptBatch, Sampler, generate_step, greedy
from .limits import check_request
from .manifest import Manifest
from .model import OnnxPaliGemma
from .preprocess import ImageInput, ImageLoadError, Pixels, image_pixels
from .text import TextCodec


@dataclass
class Timings:
    """Seconds spent on one batch, shared by its images."""

    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # decoder calls after the prefill

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else 0.0


@dataclass
class CaptionResult:
    """The caption of one input, or the reason it has none."""

    source: str
    text: str = ""
    tokens: list[int] = field(default_factory=list)  # generated ids, the stop token excluded
    error: str | None = None
    timings: Timings = field(default_factory=Timings)

    @property
    def ok(self) -> bool:
        return self.error is None


class Captioner:
    """Captions images with an exported PaliGemma folder: onnxruntime + numpy + Pillow + tokenizers."""

    def __init__(self, folder: str | Path, manifest: Manifest, model: OnnxPaliGemma):
        self.folder = Path(folder)
        self.manifest = manifest
        self.model = model
        self.text = TextCodec(folder, manifest)
        self.image_spec = manifest.image_spec

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", threads: int | None = None) -> Captioner:
        """Open an exported model folder on "auto" (CUDA when it works, else CPU), "cuda" or "cpu"."""
        manifest = Manifest.load(folder)
        return cls(folder, manifest, OnnxPaliGemma(folder, manifest, device, threads))

    @property
    def device(self) -> str:
        """Where every graph of the model runs: "cuda" or "cpu"."""
        return self.model.device

    @property
    def providers(self) -> list[str]:
        return list(self.model.providers)

    def caption(
        self,
        images: Sequence[ImageInput],
        *,
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        ignore_eos: bool = False,
    ) -> list[CaptionResult]:
        """Caption `images` (paths, PIL images or `Pixels`), one result per input in order.

        `prompt` is one prompt for all images or one per image. `sampler` and `logits_processors` come from
        `make_sampler` / `make_logits_processors` (default: greedy, none). An unreadable input gets a
        result with `error` set; the other images are still captioned. `ignore_eos` always generates
        `max_new_tokens` (for benchmarks with a fixed length). Images are loaded one batch at a time.
        """
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        check_request(self.manifest, self.text, prompts, max_new_tokens, batch_size)  # RequestError: ValueError
        results = [CaptionResult(source=_name(image)) for image in images]
        pending: list[tuple[int, np.ndarray]] = []
        for i, image in enumerate(images):
            try:
                pending.append((i, self._pixels(image)))
            except ImageLoadError as exc:
                results[i].error = str(exc)
            if pending and (len(pending) == batch_size or i == len(images) - 1):
                indices = [index for index, _ in pending]
                batch = self._caption_batch(
                    np.stack([pixels for _, pixels in pending]), [prompts[index] for index in indices],
                    max_new_tokens=max_new_tokens, sampler=sampler or greedy,
                    logits_processors=logits_processors or [],
                    eos_ids=[] if ignore_eos else self.manifest.eos_token_ids,
                )
                for index, (tokens, timings) in zip(indices, batch):
                    results[index].tokens, results[index].timings = tokens, timings
                    results[index].text = self.text.decode(tokens)
                pending.clear()
        return results

    def prompt_batch(self, pixels: np.ndarray, prompts: list[str]) -> PromptBatch:
        """Encode pixel values [n, 3, H, W] and build the left-padded prefill inputs of one batch."""
        m = self.manifest
        features = self.model.encode_images(pixels)
        ids, attention_mask = self._left_padded([self.text.prompt_ids(p) for p in prompts])
        position_ids = np.where(attention_mask == 0, 1, attention_mask.cumsum(-1) - 1) + 1  # 1-indexed
        embeds = self.model.embed_tokens(np.where(ids == m.image_token_id, m.pad_token_id, ids))
        embeds[ids == m.image_token_id] = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
        return PromptBatch(ids, embeds, attention_mask, position_ids)

    def prefill_logits(self, images: Sequence[ImageInput], prompts: list[str]) -> np.ndarray:
        """Next-token logits [b, vocab] after the prompt: what validation compares with transformers."""
        batch = self.prompt_batch(np.stack([self._pixels(image) for image in images]), prompts)
        state = self.model.new_state(max_len=batch.ids.shape[1] + 1)
        return state.prefill(batch).logits()

    def _pixels(self, image: ImageInput) -> np.ndarray:
        return image.values if isinstance(image, Pixels) else image_pixels(image, self.image_spec)

    def _caption_batch(
        self,
        pixels: np.ndarray,
        prompts: list[str],
        *,
        max_new_tokens: int,
        sampler: Sampler,
        logits_processors: Sequence[LogitsProcessor],
        eos_ids: list[int],
    ) -> list[tuple[list[int], Timings]]:
        timings = Timings()
        started = time.perf_counter()
        batch = self.prompt_batch(pixels, prompts)
        timings.vision_s = time.perf_counter() - started  # image encoding and prompt embedding
        started = time.perf_counter()
        state = self.model.new_state(max_len=batch.ids.shape[1] + max_new_tokens)
        steps = generate_step(state, batch, max_new_tokens=max_new_tokens, eos_ids=eos_ids, sampler=sampler,
                              logits_processors=logits_processors)
        tokens: list[list[int]] = [[] for _ in prompts]
        eos = set(eos_ids)
        for n, (rows, chosen) in enumerate(steps):
            now = time.perf_counter()
            if n == 0:
                timings.prefill_s = now - started
            else:
                timings.decode_s += now - started
                timings.decode_steps += 1
            for row, token in zip(rows.tolist(), chosen.tolist()):
                if token not in eos:
                    tokens[row].append(token)
            started = time.perf_counter()
        return [(t, timings) for t in tokens]

    def _left_padded(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.manifest.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = 1
        return ids, mask


def _name(image: ImageInput) -> str:
    if isinstance(image, Pixels):
        return image.source
    return str(image) if isinstance(image, (str, Path)) else "<PIL image>"

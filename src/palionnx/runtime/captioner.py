"""`Captioner`: the public API. Loads a model folder and captions images in batches."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .generate import LogitsProcessor, Sampler, generate_step, make_logits_processors, make_sampler
from .manifest import Manifest
from .model import OnnxPaliGemma
from .preprocess import ImageInput, ImageLoadError, load_image, pixel_values
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
class PromptBatch:
    """Prefill inputs of one batch: ids and embeddings left-padded to a common length."""

    ids: np.ndarray  # [b, s] int64, image tokens included
    inputs_embeds: np.ndarray  # [b, s, hidden], image features in the image-token slots
    attention_mask: np.ndarray  # [b, s], 0 on the left padding
    position_ids: np.ndarray  # [b, s], 1-indexed over real tokens


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

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", threads: int | None = None) -> Captioner:
        """Open an exported model folder on "auto" (CUDA when it works, else CPU), "cuda" or "cpu"."""
        manifest = Manifest.load(folder)
        return cls(folder, manifest, OnnxPaliGemma(folder, manifest, device, threads))

    @property
    def providers(self) -> list[str]:
        return list(self.model.providers)

    def caption(
        self,
        images: Sequence[ImageInput],
        prompt: str | Sequence[str] = "caption en",
        max_new_tokens: int = 256,
        batch_size: int = 4,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int = 0,
        ignore_eos: bool = False,
    ) -> list[CaptionResult]:
        """Caption `images` (paths or PIL images), one result per input in order.

        `prompt` is one prompt for all images or one per image. Greedy unless `temperature` > 0.
        An unreadable input gets a result with `error` set; the other images are still captioned.
        `ignore_eos` always generates `max_new_tokens` (for benchmarks with a fixed length).
        """
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        sampler = make_sampler(temperature, top_k, top_p, seed)
        processors = make_logits_processors(repetition_penalty, no_repeat_ngram_size)

        results = [CaptionResult(source=_name(image)) for image in images]
        eos_ids = [] if ignore_eos else self.manifest.eos_token_ids
        pending: list[tuple[int, Image.Image]] = []  # loaded lazily: at most one batch of images in memory

        def run_pending() -> None:
            indices = [i for i, _ in pending]
            batch = self._caption_batch([image for _, image in pending], [prompts[i] for i in indices],
                                        max_new_tokens, sampler, processors, eos_ids)
            for i, (tokens, timings) in zip(indices, batch):
                results[i].tokens, results[i].timings = tokens, timings
                results[i].text = self.text.decode(tokens)
            pending.clear()

        for i, image in enumerate(images):
            try:
                pending.append((i, load_image(image)))
            except ImageLoadError as exc:
                results[i].error = str(exc)
            if len(pending) == batch_size:
                run_pending()
        if pending:
            run_pending()
        return results

    def prompt_batch(self, images: list, prompts: list[str]) -> PromptBatch:
        """Encode RGB images and build the left-padded prefill inputs of one batch."""
        m = self.manifest
        pixels = pixel_values(images, m.image_size, m.image_mean, m.image_std, m.rescale_factor, m.resample)
        features = self.model.encode_images(pixels)
        ids, attention_mask = self._left_padded([self.text.prompt_ids(p) for p in prompts])
        position_ids = np.where(attention_mask == 0, 1, attention_mask.cumsum(-1) - 1) + 1  # 1-indexed
        embeds = self.model.embed_tokens(np.where(ids == m.image_token_id, m.pad_token_id, ids))
        embeds[ids == m.image_token_id] = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
        return PromptBatch(ids, embeds, attention_mask, position_ids)

    def prefill_logits(self, images: list, prompts: list[str]) -> np.ndarray:
        """Next-token logits [b, vocab] after the prompt: what validation compares with transformers."""
        batch = self.prompt_batch(images, prompts)
        state = self.model.new_state(max_len=batch.ids.shape[1] + 1)
        return state.prefill(batch.inputs_embeds, batch.attention_mask, batch.position_ids).logits()

    def _caption_batch(
        self,
        images: list,
        prompts: list[str],
        max_new_tokens: int,
        sampler: Sampler,
        processors: list[LogitsProcessor],
        eos_ids: list[int],
    ) -> list[tuple[list[int], Timings]]:
        timings = Timings()
        started = time.perf_counter()
        batch = self.prompt_batch(images, prompts)
        timings.vision_s = time.perf_counter() - started  # image encoding and prompt embedding
        started = time.perf_counter()
        state = self.model.new_state(max_len=batch.ids.shape[1] + max_new_tokens)
        steps = generate_step(
            state, batch.inputs_embeds, batch.attention_mask, batch.position_ids, batch.ids,
            sampler, processors, eos_ids, max_new_tokens,
        )
        tokens: list[list[int]] = [[] for _ in images]
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
    return str(image) if isinstance(image, (str, Path)) else "<PIL image>"

"""`Captioner`: the public API. Loads a model folder and captions images in batches."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_CUDA_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from .generate import LogitsProcessor, Sampler, generate_step, greedy
from .limits import check_request
from .manifest import Manifest
from .model import DecoderState, OnnxPaliGemma
from .preprocess import ImageInput, ImageLoadError, Pixels, image_pixels
from .prompt import PromptBatch
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
    attempts: int = 1  # captions generated for this input (more than one when a `Retry` asked again)

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
        self._pool: ThreadPoolExecutor | None = None  # image decoding threads, made on first use
        self._states: dict[tuple[int, int], DecoderState] = {}  # the static batches' caches, by shape

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", threads: int | None = None,
             cuda_graph: bool = True, prefill_graph: bool = True) -> Captioner:
        """Open an exported model folder on "auto", "cuda" or "cpu".

        "auto" runs a folder built for CUDA on CUDA when it works (else on the CPU) and a folder built for
        the CPU on the CPU. `cuda_graph=False` turns off capturing the decode step as a CUDA graph;
        `prefill_graph=False` runs prompts on the decoder graph even where the folder has a faster
        decoder_prefill graph (which then takes no memory).
        """
        manifest = Manifest.load(folder)
        return cls(folder, manifest, OnnxPaliGemma(folder, manifest, device, threads, cuda_graph, prefill_graph))

    @property
    def device(self) -> str:
        """Where every graph of the model runs: "cuda" or "cpu"."""
        return self.model.device

    @property
    def providers(self) -> list[str]:
        return list(self.model.providers)

    @property
    def default_batch_size(self) -> int:
        """Images per batch when none is given: DEFAULT_CUDA_BATCH_SIZE on CUDA, DEFAULT_BATCH_SIZE on the CPU
        (runtime/defaults.py)."""
        return DEFAULT_CUDA_BATCH_SIZE if self.device == "cuda" else DEFAULT_BATCH_SIZE

    def check(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
              memory_limit: float | None = None) -> int:
        """RequestError (a ValueError) if this model cannot caption `batch_size` images at once with these
        prompts (special-token text, the model's context and, with `memory_limit` in bytes, the estimated
        KV-cache and prefill memory of its cache floor and prefill chunks: `limits.check_request`). Returns
        the longest prompt's length in tokens."""
        return check_request(self.manifest, self.text, prompts, max_new_tokens, batch_size, memory_limit,
                             self.model.min_cache_slots, self.model.prefill_chunk)

    def caption(
        self,
        images: Sequence[ImageInput],
        *,
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int | None = None,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        ignore_eos: bool = False,
    ) -> list[CaptionResult]:
        """Caption `images` (paths, PIL images or `Pixels`), one result per input in order.

        `prompt` is one prompt for all images or one per image; `batch_size` defaults to the device's
        (`default_batch_size`). `sampler` and `logits_processors` come from
        `make_sampler` / `make_logits_processors` (default: greedy, none). An unreadable input gets a
        result with `error` set; the other images are still captioned. `ignore_eos` always generates
        `max_new_tokens` (for benchmarks with a fixed length). Images are loaded one batch at a time (a batch
        with unreadable images runs with the others only).
        """
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        batch_size = batch_size or self.default_batch_size
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        self.check(prompts, max_new_tokens, batch_size)  # RequestError: a ValueError
        results = [CaptionResult(source=source_name(image)) for image in images]
        for first in range(0, len(images), batch_size):
            indices, pixels = [], []
            for index, loaded in enumerate(self._load(images[first : first + batch_size]), start=first):
                if isinstance(loaded, ImageLoadError):
                    results[index].error = str(loaded)
                else:
                    indices.append(index)
                    pixels.append(loaded)
            if not indices:
                continue
            batch = self._caption_batch(
                np.stack(pixels), [prompts[index] for index in indices], max_new_tokens=max_new_tokens,
                sampler=sampler or greedy, logits_processors=logits_processors or [],
                eos_ids=[] if ignore_eos else self.manifest.eos_token_ids,
            )
            for index, (tokens, timings) in zip(indices, batch):
                results[index].tokens, results[index].timings = tokens, timings
                results[index].text = self.text.decode(tokens)
        return results

    def prompt_batch(self, pixels: np.ndarray, prompts: list[str]) -> PromptBatch:
        """Encode pixel values [n, 3, H, W] and lay out one batch's prompts for the decoder."""
        return self.model.prompt_batch(pixels, [self.text.prompt_ids(p) for p in prompts])

    def prefill_logits(self, images: Sequence[ImageInput], prompts: list[str]) -> np.ndarray:
        """Next-token logits [b, vocab] after the prompt: what validation compares with transformers."""
        batch = self.prompt_batch(np.stack([self._pixels(image) for image in images]), prompts)
        state = self.model.new_state(len(prompts), batch.input_ids.shape[1] + 1)
        return state.prefill(batch).logits()

    def _pixels(self, image: ImageInput) -> np.ndarray:
        return image.values if isinstance(image, Pixels) else image_pixels(image, self.image_spec)

    def load_pixels(self, image: ImageInput) -> np.ndarray | ImageLoadError:
        """The model's pixel values of one image, or the ImageLoadError saying why it cannot be read."""
        try:
            return self._pixels(image)
        except ImageLoadError as exc:
            return exc

    def image_threads(self) -> ThreadPoolExecutor:
        """Threads that decode and resize images (Pillow releases the GIL), made on first use."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        return self._pool

    def _load(self, images: Sequence[ImageInput]) -> list[np.ndarray | ImageLoadError]:
        """Pixels of one batch of images, decoded on several threads; an unreadable image gives its
        ImageLoadError in its place."""
        if len(images) == 1:
            return [self.load_pixels(images[0])]
        return list(self.image_threads().map(self.load_pixels, images))

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
        state = self._state(len(prompts), batch.input_ids.shape[1] + max_new_tokens)
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


    def _state(self, batch: int, max_len: int) -> DecoderState:
        """An empty cache for a static batch: the last two shapes' states are kept and reset, so batch after
        batch runs on the same buffers (and on CUDA the same captured graph)."""
        key = (batch, self.model.cache_slots(batch, max_len))
        state = self._states.pop(key, None) or self.model.new_state(batch, max_len)
        state.reset()
        self._states[key] = state
        while len(self._states) > 2:
            self._states.pop(next(iter(self._states)))
        return state


def source_name(image: ImageInput) -> str:
    """What a result calls its input: the path, the Pixels' source, or "<PIL image>"."""
    if isinstance(image, Pixels):
        return image.source
    return str(image) if isinstance(image, (str, Path)) else "<PIL image>"

"""The three ONNX graphs of a model folder, and the decoder's KV-cache state for one batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import Manifest
from .sessions import open_session

_NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16}


class OnnxPaliGemma:
    """Sessions for vision_encoder, embed_tokens and decoder of an exported folder."""

    def __init__(self, folder: str | Path, manifest: Manifest, device: str = "auto", threads: int | None = None):
        folder = Path(folder)
        self.manifest = manifest
        graphs = manifest.graphs
        self.vision = open_session(folder / graphs["vision_encoder"].file, device, threads)
        self.embed = open_session(folder / graphs["embed_tokens"].file, device, threads)
        self.decoder = open_session(folder / graphs["decoder"].file, device, threads)
        self.providers = self.decoder.get_providers()
        self.kv_dtype = _NUMPY_DTYPE[manifest.kv_dtype]

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[n, 3, H, W] -> image features [n, image_seq_length, hidden]."""
        return self.vision.run(None, {"pixel_values": pixel_values})[0]

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """[b, s] int64 -> inputs_embeds [b, s, hidden] (scaled by sqrt(hidden))."""
        return self.embed.run(None, {"input_ids": input_ids})[0]

    def new_state(self) -> CpuDecoderState:
        """A fresh KV cache for one batch."""
        return CpuDecoderState(self)


class CpuDecoderState:
    """KV cache kept as the decoder's own `present` outputs, fed back as `past` the next step.

    onnxruntime reads numpy inputs in place, so the only per-step copy is the graph's Concat.
    """

    def __init__(self, model: OnnxPaliGemma):
        self.model = model
        m = model.manifest
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(m.layers) for kv in ("key", "value")]
        self.output_names = model.manifest.graphs["decoder"].outputs
        self.past: list[np.ndarray] = []
        self.attention_mask = np.zeros((0, 0), dtype=np.int64)
        self.next_position = np.zeros((0, 1), dtype=np.int64)

    def _run(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        feeds = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": self.attention_mask,
            "position_ids": position_ids,
            **dict(zip(self.past_names, self.past, strict=False)),
        }
        logits, *self.past = self.model.decoder.run(self.output_names, feeds)
        return logits

    def prefill(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run the whole (left-padded) prompt; returns the last position's logits [b, vocab]."""
        m = self.model.manifest
        batch = inputs_embeds.shape[0]
        empty = np.zeros((batch, m.kv_heads, 0, m.head_dim), dtype=self.model.kv_dtype)
        self.past = [empty] * len(self.past_names)
        self.attention_mask = attention_mask.astype(np.int64)
        self.next_position = position_ids[:, -1:].astype(np.int64) + 1
        return self._run(inputs_embeds.astype(np.float32), position_ids.astype(np.int64))

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """Feed one new token per sequence; returns logits [b, vocab]."""
        embeds = self.model.embed_tokens(token_ids[:, None].astype(np.int64))
        ones = np.ones((token_ids.shape[0], 1), dtype=np.int64)
        self.attention_mask = np.concatenate([self.attention_mask, ones], axis=1)
        position_ids = self.next_position
        self.next_position = position_ids + 1
        return self._run(embeds, position_ids)

    def keep(self, rows: np.ndarray) -> None:
        """Drop finished sequences: keep only `rows` of the batch."""
        self.past = [p[rows] for p in self.past]
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]

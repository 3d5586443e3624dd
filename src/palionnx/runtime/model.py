"""The three ONNX graphs of a model folder, and the decoder's KV-cache state for one batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import DECODER, EMBED_TOKENS, VISION_ENCODER, graph_io
from .generate import PromptBatch
from .manifest import Manifest
from .sessions import open_sessions

_NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16}


class OnnxPaliGemma:
    """Sessions for vision_encoder, embed_tokens and decoder of an exported folder, all on one device."""

    def __init__(self, folder: str | Path, manifest: Manifest, device: str = "auto", threads: int | None = None):
        folder = Path(folder)
        self.manifest = manifest
        paths = {role: folder / graph.file for role, graph in manifest.graphs.items()}
        sessions, self.device = open_sessions(paths, device, threads, manifest)  # "cuda"/"cpu", decided once
        self.vision, self.embed, self.decoder = sessions[VISION_ENCODER], sessions[EMBED_TOKENS], sessions[DECODER]
        self.providers = self.decoder.get_providers()
        self.kv_dtype = _NUMPY_DTYPE[manifest.kv_dtype]
        self.io = {role: graph_io(role, manifest.layers) for role in sessions}

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[n, 3, H, W] -> image features [n, image_seq_length, hidden]."""
        (name,) = self.io[VISION_ENCODER].inputs
        return self.vision.run(None, {name: pixel_values})[0]

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """[b, s] int64 -> inputs_embeds [b, s, hidden] (scaled by sqrt(hidden))."""
        (name,) = self.io[EMBED_TOKENS].inputs
        return self.embed.run(None, {name: input_ids})[0]

    def new_state(self, max_len: int) -> DecoderState:
        """A fresh KV cache of `max_len` slots (prompt + generated tokens) for one batch."""
        return DecoderState(self, max_len)


class StepOutput:
    """The decoder's outputs for one call, fetched to the host only when asked for."""

    def __init__(self, logits: ort.OrtValue, next_token: ort.OrtValue):
        self._logits = logits
        self._next_token = next_token

    def logits(self) -> np.ndarray:
        """[b, vocab] float32 scores of the next token."""
        return self._logits.numpy()

    def next_token(self) -> np.ndarray:
        """[b] int64 argmax of the logits: all a greedy loop needs to read back."""
        return self._next_token.numpy()


class DecoderState:
    """One batch's decoder with its KV cache in two preallocated buffer sets.

    Each call reads the cache from one set and writes the updated cache into the other (IO binding),
    then the two swap roles: no allocation or copy of the cache between steps, and on CUDA the cache
    never leaves the GPU. Only the new token's embedding, mask and position go in each step.
    """

    def __init__(self, model: OnnxPaliGemma, max_len: int):
        self.model = model
        self.max_len = max_len
        self.device = model.device
        io = model.io[DECODER]
        self.inputs = io.inputs[:4]  # inputs_embeds, attention_mask, position_ids, past_length
        self.outputs = io.outputs[:2]  # logits, next_token
        self.past_names, self.present_names = io.inputs[4:], io.outputs[2:]
        self.reading: list[ort.OrtValue] = []
        self.writing: list[ort.OrtValue] = []
        self.attention_mask = np.zeros((0, max_len), dtype=np.int64)
        self.filled = 0  # cache slots written so far (the same for every row: prompts are left-padded)
        self.next_position = np.zeros((0, 1), dtype=np.int64)

    def _allocate(self, batch: int, initial: list[np.ndarray] | None = None) -> None:
        m = self.model.manifest
        shape = (batch, m.kv_heads, self.max_len, m.head_dim)
        if initial is None:  # free slots must hold finite values: masked scores still multiply them
            initial = [np.zeros(shape, dtype=self.model.kv_dtype) for _ in self.past_names]
        # On CPU these wrap the numpy arrays without a copy; on CUDA they are copied to the GPU once.
        self.reading = [ort.OrtValue.ortvalue_from_numpy(array, self.device, 0) for array in initial]
        self.writing = [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self.model.kv_dtype, self.device, 0)
            for _ in self.past_names
        ]

    def _run(self, inputs_embeds: ort.OrtValue, position_ids: np.ndarray, new: int) -> StepOutput:
        binding = self.model.decoder.io_binding()
        embeds_name, mask_name, positions_name, past_length_name = self.inputs
        binding.bind_ortvalue_input(embeds_name, inputs_embeds)
        binding.bind_cpu_input(mask_name, self.attention_mask)
        binding.bind_cpu_input(positions_name, position_ids)
        binding.bind_cpu_input(past_length_name, np.array(self.filled, dtype=np.int64))
        for name, value in zip(self.past_names, self.reading):
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:  # logits, next_token: outputs come back in binding order
            binding.bind_output(name, self.device)
        for name, value in zip(self.present_names, self.writing):
            binding.bind_ortvalue_output(name, value)
        self.model.decoder.run_with_iobinding(binding)
        logits, next_token = binding.get_outputs()[:2]
        self.reading, self.writing = self.writing, self.reading
        self.filled += new
        return StepOutput(logits, next_token)

    def prefill(self, prompt: PromptBatch) -> StepOutput:
        """Run the whole left-padded prompt [b, s] into empty cache slots 0 .. s-1."""
        inputs_embeds, attention_mask, position_ids = prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids
        batch, width = attention_mask.shape
        if width >= self.max_len:
            raise ValueError(f"the prompt ({width} tokens) does not fit a cache of {self.max_len}")
        self._allocate(batch)
        self.filled = 0
        self.attention_mask = np.zeros((batch, self.max_len), dtype=np.int64)
        self.attention_mask[:, :width] = attention_mask
        self.next_position = position_ids[:, -1:].astype(np.int64) + 1
        embeds = ort.OrtValue.ortvalue_from_numpy(inputs_embeds.astype(np.float32), self.device, 0)
        return self._run(embeds, position_ids.astype(np.int64), width)

    def step(self, token_ids: np.ndarray) -> StepOutput:
        """Feed one new token per sequence into the next free slot."""
        if self.filled >= self.max_len:
            raise ValueError(f"the KV cache of {self.max_len} slots is full")
        binding = self.model.embed.io_binding()
        (ids_name,), (embeds_name,) = self.model.io[EMBED_TOKENS].inputs, self.model.io[EMBED_TOKENS].outputs
        binding.bind_cpu_input(ids_name, token_ids[:, None].astype(np.int64))
        binding.bind_output(embeds_name, self.device)
        self.model.embed.run_with_iobinding(binding)
        self.attention_mask[:, self.filled] = 1
        position_ids = self.next_position
        self.next_position = position_ids + 1
        return self._run(binding.get_outputs()[0], position_ids, 1)

    def keep(self, rows: np.ndarray) -> None:
        """Drop finished sequences: keep only `rows` of the batch (copies the cache once)."""
        kept = [value.numpy()[rows] for value in self.reading]
        self._allocate(len(rows), kept)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]

"""The decoder's weights read one tensor at a time from a checkpoint's safetensors files.

The decoder graph is written from these (export/decoder.py), so building it holds one weight in memory at
a time rather than the whole model. Checkpoints name the language model's tensors
`language_model.model.layers.N...` (as released) or `model.language_model.layers.N...` (newer saves); both
are found. The rotary tables come from transformers' own rotary module, so they match it to the bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .rotary import rope_theta, rotary_tables

_ATTENTION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class CheckpointWeights:
    """`DecoderWeights` over a local checkpoint folder; arrays come back as `dtype` ("float32"/"float16")."""

    def __init__(self, folder: Path, text_config: Any, dtype: str = "float32"):
        self.folder, self.text_config, self.dtype = folder, text_config, dtype
        self.files = tensor_files(folder)
        embed = [name for name in self.files if name.endswith("embed_tokens.weight") and "language_model" in name]
        if len(embed) != 1:
            raise ValueError(f"{folder}: cannot find the language model's embed_tokens.weight in the safetensors")
        self.prefix = embed[0][: -len("embed_tokens.weight")]

    def embedding(self) -> np.ndarray:
        return self._tensor("embed_tokens.weight")

    def embedding_rows(self, ids: list[int]) -> np.ndarray:
        """[len(ids), hidden]: a few rows of the embedding, read without the whole table."""
        import torch
        from safetensors import safe_open

        key = self.prefix + "embed_tokens.weight"
        with safe_open(str(self.files[key]), framework="pt") as handle:
            table = handle.get_slice(key)
            rows = [table[i : i + 1] for i in ids]
        return torch.cat(rows).to(getattr(torch, self.dtype)).numpy()

    def linear(self, layer: int, name: str) -> np.ndarray:
        return self._tensor(f"layers.{layer}.{(_ATTENTION | _MLP)[name]}.weight")

    def norm(self, layer: int | None, name: str) -> np.ndarray:
        return self._tensor("norm.weight" if layer is None else f"layers.{layer}.{name}.weight")

    def rotary(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [positions, head_dim/2] for positions 1 .. positions (PaliGemma counts from 1): in numpy for
        the default RoPE (export/rotary.py), else from transformers' own rotary module."""
        theta = rope_theta(self.text_config)
        if theta is not None:
            t = self.text_config
            return rotary_tables(getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads, theta,
                                 positions)
        import torch
        from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

        rotary_class = Gemma2RotaryEmbedding if self.text_config.model_type == "gemma2" else GemmaRotaryEmbedding
        rotary = rotary_class(config=self.text_config)
        position_ids = torch.arange(1, positions + 1, dtype=torch.int64)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
        half = cos.shape[-1] // 2
        return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()

    def _tensor(self, name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        key = self.prefix + name
        if key not in self.files:
            raise ValueError(f"{self.folder}: tensor {key} is missing from the checkpoint")
        with safe_open(str(self.files[key]), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        return tensor.to(getattr(torch, self.dtype)).numpy()


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded checkpoints through their index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files

"""`PromptBatch`: the decoder's prefill input for a batch of prompts, and how prompts are laid out in it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class PromptBatch:
    """Prefill inputs of one batch of prompts of different lengths."""

    ids: np.ndarray  # [b, s] int64 left-padded with pad ids, image tokens included: the processors' history
    input_ids: np.ndarray  # [b, s] int64 right-padded (the decoder's layout); -1 - k where image feature row k goes
    image_features: Any  # the vision encoder's output for the batch (an onnxruntime OrtValue, on the device)
    lengths: np.ndarray  # [b] real tokens per row

    def history(self, row: int) -> np.ndarray:
        """Row `row`'s prompt ids without padding (image tokens as such): what its processors see first."""
        return self.ids[row, self.ids.shape[1] - int(self.lengths[row]) :].copy()


def lay_out(sequences: list[list[int]], image_features: Any, *, pad_id: int, image_token_id: int,
            image_tokens: int) -> PromptBatch:
    """The batch of prompts whose token ids are `sequences` (each with `image_tokens` image tokens), reading
    its image features from `image_features` (row k of image i: feature row i * image_tokens + k)."""
    lengths = np.array([len(s) for s in sequences])
    width = int(lengths.max())
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = sequence
        input_ids[row, : len(sequence)] = sequence
        slots = np.flatnonzero(input_ids[row] == image_token_id)
        if len(slots) != image_tokens:
            raise ValueError(f"the prompt template gives {len(slots)} image tokens; the model has "
                             f"{image_tokens} image features per image")
        input_ids[row, slots] = -1 - (row * image_tokens + np.arange(len(slots)))
    return PromptBatch(ids, input_ids, image_features, lengths)


"""The vision encoder of PaliGemma as a torch module for torch.onnx export.

`VisionEncoder`: pixel_values -> image_features (SigLIP + projector, not scaled). The decoder is not
traced: export/decoder.py writes it node by node.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """pixel_values [b, 3, H, W] -> image_features [b, image_seq_length, hidden] in float32."""

    def __init__(self, model: Any):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.projector.linear.weight.dtype
        hidden = self.vision_tower(pixel_values.to(dtype)).last_hidden_state
        return self.projector(hidden).float()

"""The vision encoder of PaliGemma as a torch module for torch.onnx export.

`VisionEncoder`: pixel_values -> image_features (SigLIP + projector, not scaled). The decoder is not
traced: export/decoder.py writes it node by node. `load_vision_encoder` builds it from a checkpoint folder
reading only the vision tower's and projector's tensors, so a 10B or 28B checkpoint exports its vision encoder
in the memory of a 0.4B one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

_PARTS = ("vision_tower.", "multi_modal_projector.")


class VisionEncoder(nn.Module):
    """pixel_values [b, 3, H, W] -> image_features [b, image_seq_length, hidden] in float32."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module):
        super().__init__()
        self.vision_tower, self.projector = vision_tower, projector

    @classmethod
    def of(cls, model: Any) -> VisionEncoder:
        """The vision encoder of a loaded `PaliGemmaForConditionalGeneration`."""
        return cls(model.model.vision_tower, model.model.multi_modal_projector)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.projector.parameters()).dtype
        hidden = self.vision_tower(pixel_values.to(dtype)).last_hidden_state
        return self.projector(hidden).float()


def load_vision_encoder(config: Any, tensor_files: dict[str, Path]) -> VisionEncoder:
    """The float32 vision encoder of a checkpoint (its PaliGemma `config`; `tensor_files` maps its tensor names
    to safetensors files, as `weights.tensor_files` reads them), with no language-model weight read."""
    from safetensors import safe_open
    from transformers import AutoModel
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector

    encoder = VisionEncoder(AutoModel.from_config(config.vision_config, attn_implementation="eager"),
                            PaliGemmaMultiModalProjector(config))
    expected = set(encoder.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name, path in tensor_files.items():
        part = next((p for p in _PARTS if name.startswith((p, "model." + p))), None)
        if part is None:
            continue
        local = name[name.index(part):].replace("multi_modal_projector.", "projector.", 1)
        # released checkpoints nest SigLIP under vision_model.; transformers' own saves may not
        spellings = (local, local.replace("vision_tower.vision_model.", "vision_tower.", 1),
                     local.replace("vision_tower.", "vision_tower.vision_model.", 1))
        with safe_open(str(path), framework="pt") as handle:
            state[next((n for n in spellings if n in expected), local)] = handle.get_tensor(name).float()
    encoder.load_state_dict(state, strict=True)
    return encoder.eval().requires_grad_(False)

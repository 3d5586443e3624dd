"""The torch-free vision graph (export/vision_graph.py) against transformers' vision tower and projector."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from palionnx.export.vision_graph import VisionConfig, build_vision


class ModelWeights:
    """`VisionWeights` over a transformers PaliGemma model's state dict."""

    def __init__(self, model):
        self.state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def tensor(self, name: str) -> np.ndarray:
        if name.startswith("projector."):
            return self.state["model.multi_modal_projector." + name.removeprefix("projector.")]
        for prefix in ("model.vision_tower.", "model.vision_tower.vision_model."):  # transformers 5, and 4
            if prefix + name in self.state:
                return self.state[prefix + name]
        raise KeyError(name)


@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
def test_vision_graph_computes_what_transformers_does(reference, family, tmp_path):
    import torch

    from palionnx.export.vision import VisionEncoder

    model, _ = reference(family)
    v = model.config.vision_config
    config = VisionConfig(v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                          v.num_attention_heads, model.config.text_config.hidden_size, v.layer_norm_eps)
    info = build_vision(tmp_path, config, ModelWeights(model))
    pixels = np.random.default_rng(0).uniform(-1, 1, (3, 3, v.image_size, v.image_size)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / info.file), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {info.inputs[0]: pixels})
    with torch.no_grad():
        theirs = VisionEncoder.of(model).eval()(torch.from_numpy(pixels)).numpy()
    assert ours.shape == theirs.shape == (3, config.patches, config.projection)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)

"""The vision encoder (SigLIP + PaliGemma's projector) written node by node from numpy weights: no torch.

pixel_values [b, 3, S, S] -> image_features [b, (S / patch)^2, projection] float32, not scaled, as
`export/vision.py`'s torch module computes it: a Conv patch embedding plus position embeddings, per layer
LayerNorm -> attention (q, k, v with biases, softmax of q k^T / sqrt(head_dim)) -> out projection ->
residual, LayerNorm -> fc1 -> Gelu(tanh) -> fc2 -> residual, then the post LayerNorm and the projector.
Weights are read by their transformers names relative to the vision model (`VisionWeights`), so a
checkpoint's tensors and a test's random arrays serve alike. This is the first piece of the torch-free test
tier (issue 24): `tests/test_vision_graph.py` checks it against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..runtime.contract import GRAPH_FILES, VISION_ENCODER, data_file, graph_io
from ..runtime.manifest import GraphInfo
from .onnx_builder import GraphBuilder, Weights
from .quantize import OPSET

F32 = np.float32


class VisionWeights(Protocol):
    """Float arrays by their transformers name (e.g. `encoder.layers.0.self_attn.q_proj.weight`, relative
    to the vision model; `projector.linear.weight` for the projector)."""

    def tensor(self, name: str) -> np.ndarray: ...


@dataclass(frozen=True)
class VisionConfig:
    """Shapes of SigLIP and the projector."""

    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    projection: int  # the decoder's hidden size
    eps: float = 1e-6

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_vision(folder: Path, config: VisionConfig, source: VisionWeights) -> GraphInfo:
    """Write `vision_encoder.onnx` and its data file into `folder`."""
    path = folder / GRAPH_FILES[VISION_ENCODER]
    weights = Weights(folder / data_file(path.name))
    try:
        builder = GraphBuilder(weights)
        io = graph_io(VISION_ENCODER, 0)
        _VisionGraph(builder, config, source).build(io.inputs[0], io.outputs[0])
        builder.save(path, OPSET)
    finally:
        weights.close()
    return GraphInfo(file=path.name, inputs=io.inputs, outputs=io.outputs)


class _VisionGraph:
    def __init__(self, g: GraphBuilder, config: VisionConfig, source: VisionWeights):
        self.g, self.c, self.src = g, config, source

    def build(self, pixels: str, features: str) -> None:
        g, c = self.g, self.c
        g.input(pixels, F32, ["batch", 3, c.image_size, c.image_size])
        g.output(features, F32, ["batch", c.patches, c.projection])
        patches = g.op("Conv", [pixels, self._w("embeddings.patch_embedding.weight"),
                                self._w("embeddings.patch_embedding.bias")], "patch_embedding",
                       kernel_shape=[c.patch_size] * 2, strides=[c.patch_size] * 2)[0]
        flat = g.op("Reshape", [patches, g.constant("shape.flat", [0, c.hidden, -1], np.int64)], "flatten")[0]
        h = g.op("Transpose", [flat], "to_tokens", perm=[0, 2, 1])[0]
        h = g.op("Add", [h, self._w("embeddings.position_embedding.weight")], "positions")[0]
        for layer in range(c.layers):
            h = self._layer(layer, h)
        h = self._norm("post_layernorm", h)
        g.op("Add", [g.op("MatMul", [h, self._linear("projector.linear.weight")], "projector")[0],
                     self._w("projector.linear.bias")], "projector.bias", outputs=[features])

    def _layer(self, layer: int, h: str) -> str:
        g, c = self.g, self.c
        name = f"encoder.layers.{layer}"
        heads, head_dim = c.heads, c.hidden // c.heads
        x = self._norm(f"{name}.layer_norm1", h)
        split = g.constant("shape.heads", [0, 0, heads, head_dim], np.int64)

        def projected(part: str, perm: list[int]) -> str:
            y = self._dense(f"{name}.self_attn.{part}_proj", x)
            return g.op("Transpose", [g.op("Reshape", [y, split], f"{name}.{part}.split")[0]], f"{name}.{part}.heads",
                        perm=perm)[0]

        q, k, v = projected("q", [0, 2, 1, 3]), projected("k", [0, 2, 3, 1]), projected("v", [0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k], f"{name}.scores")[0],
                              g.constant("scale.attention", head_dim**-0.5, F32)], f"{name}.scaled")[0]
        attended = g.op("MatMul", [g.op("Softmax", [scores], f"{name}.softmax", axis=-1)[0], v], f"{name}.attend")[0]
        merged = g.op("Reshape", [g.op("Transpose", [attended], f"{name}.merge", perm=[0, 2, 1, 3])[0],
                                  g.constant("shape.merged", [0, 0, c.hidden], np.int64)], f"{name}.merged")[0]
        h = g.op("Add", [h, self._dense(f"{name}.self_attn.out_proj", merged)], f"{name}.residual1")[0]
        x = self._norm(f"{name}.layer_norm2", h)
        x = g.op("Gelu", [self._dense(f"{name}.mlp.fc1", x)], f"{name}.gelu", approximate="tanh")[0]
        return g.op("Add", [h, self._dense(f"{name}.mlp.fc2", x)], f"{name}.residual2")[0]

    def _norm(self, name: str, x: str) -> str:
        return self.g.op("LayerNormalization", [x, self._w(f"{name}.weight"), self._w(f"{name}.bias")], name,
                         axis=-1, epsilon=self.c.eps)[0]

    def _dense(self, name: str, x: str) -> str:
        """x @ W^T + b of a transformers Linear (weights stored [in, out] for MatMul)."""
        y = self.g.op("MatMul", [x, self._linear(f"{name}.weight")], name)[0]
        return self.g.op("Add", [y, self._w(f"{name}.bias")], f"{name}.bias")[0]

    def _linear(self, name: str) -> str:
        return self.g.weight(name, lambda: np.ascontiguousarray(self.src.tensor(name).astype(F32).T))

    def _w(self, name: str) -> str:
        return self.g.weight(name, lambda: self.src.tensor(name).astype(F32))

"""A complete CPU model folder (fp32, int8 or int4) from seeded numpy weights of a synth geometry, without torch.

The decoder goes through the exporter's own graph writer (`export/decoder.py` over `NumpyWeights`, numpy
rotary tables), the vision encoder through `export/vision_graph.py` (and, at int8/int4, the exporter's graph
quantizer: MatMulNBits at block 32 everywhere, as an uncalibrated export of a tiny model), the tokenizer is
`synth.build_tokenizer`'s and the manifest is checked and saved as an export's is. The weights follow the same recipe as
`synth.write_checkpoint` (scaled noise, random norm gains) but are not the same numbers: these folders are for
tests of the runtime, the jobs and the server, not for parity with transformers.
"""

from __future__ import annotations

import math
import shutil
import zlib
from pathlib import Path

import numpy as np

from ..runtime.contract import MANIFEST_NAME, TOKENIZER_NAME, VISION_ENCODER
from ..runtime.integrity import record_files
from ..runtime.manifest import GraphInfo, Manifest, QuantInfo
from ..testmodels.synth import END_OF_TURN_ID, GEOMETRIES, Geometry, build_tokenizer
from ..version import __version__
from . import graph_quantize, quantize
from .decoder import DecoderConfig, Precision, build_decoder
from .rotary import rotary_tables
from .vision_graph import VisionConfig, build_vision

MAX_POSITIONS = 8192  # Gemma's context
ROPE_THETA = 10000.0
BLOCK_SIZE = 32  # of int8/int4 weights
LEVELS = ("fp32", "int8", "int4")


class NumpyWeights:
    """Seeded random decoder (`DecoderWeights`) and vision (`VisionWeights`) weights of a geometry."""

    def __init__(self, geometry: Geometry, seed: int = 0):
        self.g, self.seed = geometry, seed
        self.scale = 1.0 if geometry.hidden >= 1024 else 2.0
        self.config = decoder_config(geometry)

    def _random(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])  # one stream per tensor name
        return (rng.standard_normal(shape, dtype=np.float32) * std + mean).astype(np.float32)

    def embedding(self) -> np.ndarray:
        embed = self.scale * (0.25 if self.g.family == "pg2" else 1.0)
        return self._random("embed", (self.g.vocab_size, self.g.hidden), embed / math.sqrt(self.g.hidden))

    def linear(self, layer: int, name: str) -> np.ndarray:
        out, inner = self.config.linear_shape(name)
        return self._random(f"layers.{layer}.{name}", (out, inner), self.scale / math.sqrt(inner))

    def norm(self, layer: int | None, name: str) -> np.ndarray:
        gain = 1.0 if name.startswith("post_") else 0.0  # Gemma 2's post-sublayer norms N(1, 0.5)
        return self._random(f"norm.{layer}.{name}", (self.g.hidden,), 0.5, gain)

    def rotary(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        return rotary_tables(self.g.head_dim, ROPE_THETA, positions)

    def tensor(self, name: str) -> np.ndarray:
        """A vision tower or projector tensor by its transformers name."""
        g = self.g
        d, m = g.vision_hidden, g.vision_intermediate
        shapes = {"embeddings.patch_embedding.weight": (d, 3, g.patch_size, g.patch_size),
                  "embeddings.patch_embedding.bias": (d,),
                  "embeddings.position_embedding.weight": (g.image_seq_length, d),
                  "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
                  "projector.linear.weight": (g.hidden, d), "projector.linear.bias": (g.hidden,)}
        part = name.split(".", 3)[-1] if name.startswith("encoder.layers.") else name
        layer_shapes = {"layer_norm1.weight": (d,), "layer_norm1.bias": (d,), "layer_norm2.weight": (d,),
                        "layer_norm2.bias": (d,), "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,),
                        "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,)}
        layer_shapes |= {f"self_attn.{p}_proj.{k}": (d, d) if k == "weight" else (d,)
                         for p in ("q", "k", "v", "out") for k in ("weight", "bias")}
        shape = shapes.get(name) or layer_shapes[part]
        if "norm" in name and name.endswith("weight"):
            return self._random(name, shape, 0.5, 1.0)  # SigLIP's LayerNorm uses its gain directly
        if len(shape) == 1:
            return self._random(name, shape, 0.02)
        return self._random(name, shape, 1.0 / math.sqrt(math.prod(shape[1:])))


def decoder_config(g: Geometry) -> DecoderConfig:
    """The decoder graph's settings for a geometry, as transformers' config of `synth.make_config` gives them."""
    shapes = dict(layers=g.layers, hidden=g.hidden, intermediate=g.intermediate, heads=g.heads, kv_heads=g.kv_heads,
                  head_dim=g.head_dim, vocab=g.vocab_size, eps=1e-6, max_positions=MAX_POSITIONS,
                  scale=g.head_dim**-0.5)
    if g.family != "pg2":
        return DecoderConfig(**shapes)
    return DecoderConfig(**shapes, attn_softcap=50.0, final_softcap=30.0,
                         sliding=tuple(i % 2 == 0 for i in range(g.layers)), window=g.sliding_window)


def write_folder(geometry: str | Geometry, outdir: str | Path, seed: int = 0, level: str = "fp32") -> Path:
    """Write a CPU model folder of `geometry` at `level` (one of LEVELS) with seeded numpy weights into
    `outdir`; returns it."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: numpy folders are {', '.join(LEVELS)}")
    g = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    folder = Path(outdir)
    folder.mkdir(parents=True, exist_ok=True)
    weights = NumpyWeights(g, seed)
    build_tokenizer(g).save(str(folder / TOKENIZER_NAME))
    if level == "fp32":
        precision = Precision.for_level(level, "cpu", g.family == "pg2", BLOCK_SIZE)
        quant = QuantInfo(level=level)
    else:
        kernel = quantize.nbits(level, BLOCK_SIZE)
        precision = Precision.for_level(level, "cpu", g.family == "pg2", BLOCK_SIZE, kernel, kernel)
        quant = QuantInfo(level=level, bits=quantize.BITS[level], block_size=BLOCK_SIZE, symmetric=True,
                          accuracy_level=precision.accuracy_level, method="MatMulNBits + GatherBlockQuantized")
    graphs = {VISION_ENCODER: _vision(folder, g, weights, precision.kernel),
              **build_decoder(folder, weights.config, precision, weights)}
    manifest = Manifest(
        family=g.family, image_size=g.image_size, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample="bicubic",
        rescale_factor=1 / 255, image_seq_length=g.image_seq_length, image_token_id=g.image_token_id,
        bos_token_id=2, eos_token_ids=[1, END_OF_TURN_ID] if g.family == "pg2" else [1], pad_token_id=0,
        prompt_template="{image}{bos}{prompt}\n", layers=g.layers, heads=g.heads, kv_heads=g.kv_heads,
        head_dim=g.head_dim, hidden=g.hidden, vocab_size=g.vocab_size, max_positions=MAX_POSITIONS,
        sliding_window=g.sliding_window if g.family == "pg2" else None, quant=quant, device="cpu",
        kv_dtype="float32", graphs=graphs, opset=quantize.OPSET,
        source={"id": f"numpy:{g.family}:{seed}", "revision": None}, palionnx_version=__version__)
    manifest.files = record_files(folder, skip=(MANIFEST_NAME,))
    manifest.save(folder)
    return folder


def _vision(folder: Path, g: Geometry, weights: NumpyWeights, kernel: quantize.Kernel | None) -> GraphInfo:
    """The vision encoder in `folder`: fp32, or quantized on `kernel` from an fp32 one written aside."""
    config = VisionConfig(g.image_size, g.patch_size, g.vision_hidden, g.vision_intermediate, g.vision_layers,
                          g.vision_heads, g.hidden)
    if kernel is None:
        return build_vision(folder, config, weights)
    scratch = folder / ".vision"
    scratch.mkdir(exist_ok=True)
    try:
        info = build_vision(scratch, config, weights)
        graph_quantize.quantize_graph(scratch / info.file, folder / info.file, kernel, quantize.CPU_ACCURACY_LEVEL)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return info

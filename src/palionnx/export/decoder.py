"""PaliGemma's Gemma / Gemma 2 decoder as one fused ONNX graph, written node by node from the weights.

Per layer (Gemma): SkipSimplifiedLayerNormalization (residual add + RMSNorm), one packed QKV MatMul,
GroupQueryAttention (rotary inside, the KV cache updated in place in one preallocated buffer, attention
over each row's filled length only), the o_proj MatMul, SkipSimplifiedLayerNormalization, gate and up
MatMuls, Gelu (tanh), Mul, down MatMul: 10 nodes; Gemma 2 adds its two post-sublayer norms. onnxruntime-genai's
model builder assembles Gemma the same way; this module follows PaliGemma's semantics on top of it:

- the prompt (image tokens + `<bos>` + prompt + `\\n`) attends bidirectionally: GroupQueryAttention with
  `causal=0`. A decode step feeds one token, for which causal and bidirectional are the same;
- positions are 1-indexed: the rotary tables are shifted by one (slot i holds position i + 1);
- text embeddings are scaled by sqrt(hidden); image features (the vision graph's output, bound as is)
  replace the embeddings where `input_ids` is negative (-1 - id is the feature row) and are not scaled;
- Gemma 2: attention soft-capping, final-logit soft-capping and sliding-window layers. `causal=0` cannot
  be combined with a window in GroupQueryAttention, so Gemma 2 folders carry a second graph,
  `decoder_windowed`, sharing the same weights file, whose sliding layers are causal with
  `local_window_size`: the runtime uses it for decode steps whenever a sequence can outgrow the window.

Kernels: int8/int4 linear layers run on `Precision.kernel` (MatMulNBits, or for CPU int8 possibly int8 QGEMM);
when `Precision.prefill_kernel` differs (CPU folders, chosen by measurement in export/tune.py), a third graph,
`decoder_prefill`, is the same decoder with its linear layers on that kernel, sharing every other weight
(embedding table, norms, rotary tables) in the same weights file; the runtime runs prompts on it.
fp32/fp16/bf16 linear layers are MatMuls over [K, N] weights, or with `Precision.transposed` FusedMatMul
(transB=1) over [N, K] (PyTorch's layout), which cuBLAS multiplies by one token as a dot product per
contiguous row (the lm_head's `Gemm(transB=1)` always is).

Precision: fp32 and CPU-targeted int8/int4 compute in float32. Half precision (fp16, and CUDA-targeted
int8/int4) computes matmuls, attention and the KV cache in float16; Gemma 2 keeps its residual stream and
norms in float32, because it overflows float16 there (the tests provoke it); Gemma keeps everything in
float16 (its fused norms accumulate in float32 internally). bf16 (CUDA only) computes everything in
bfloat16, the checkpoints' own type, whose float32 range lets Gemma 2's residual stream stay in it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np
from onnx import helper

from ..runtime.contract import (
    DECODER,
    DECODER_PREFILL,
    DECODER_WINDOWED,
    GRAPH_FILES,
    CacheIO,
    DecoderIO,
    data_file,
    graph_io,
)
from ..runtime.manifest import GraphInfo
from . import quantize
from .linear import PLAIN, LinearInput, SitePlan
from .onnx_builder import GraphBuilder, Weights

F32, F16, BF16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
GQA_HEAD_MULTIPLE = 8  # onnxruntime's GroupQueryAttention refuses other head sizes ("must be a multiple of 8")
GQA_CUDA_MAX_HEAD = 256  # ... and on CUDA larger ones (its MAX_HEAD_SIZE: onnxruntime issue 28196)


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's shapes and Gemma / Gemma 2 settings."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    scale: float  # attention score scale
    max_positions: int
    attn_softcap: float = 0.0  # Gemma 2: scores -> softcap * tanh(scores / softcap)
    final_softcap: float = 0.0  # Gemma 2: the same on the logits
    sliding: tuple[bool, ...] = ()  # Gemma 2: which layers use the sliding window
    window: int = 0

    @property
    def gemma2(self) -> bool:
        return any(self.sliding)

    def linear_shape(self, part: str) -> tuple[int, int]:
        """(out, in) of a linear layer: q, k, v, o, gate, up or down."""
        attention, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q": (attention, self.hidden), "k": (kv, self.hidden), "v": (kv, self.hidden),
                "o": (self.hidden, attention), "gate": (self.intermediate, self.hidden),
                "up": (self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}[part]

    @classmethod
    def from_text_config(cls, text: Any) -> DecoderConfig:
        """From a transformers GemmaConfig / Gemma2Config."""
        shapes = dict(layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                      heads=text.num_attention_heads,
                      kv_heads=text.num_key_value_heads, head_dim=text.head_dim, vocab=text.vocab_size,
                      eps=text.rms_norm_eps, max_positions=text.max_position_embeddings)
        if text.model_type != "gemma2":
            return cls(scale=text.head_dim**-0.5, **shapes)
        return cls(scale=text.query_pre_attn_scalar**-0.5, attn_softcap=text.attn_logit_softcapping or 0.0,
                   final_softcap=text.final_logit_softcapping or 0.0,
                   sliding=tuple(t == "sliding_attention" for t in text.layer_types), window=text.sliding_window,
                   **shapes)


@dataclass(frozen=True)
class Precision:
    """How the graph stores weights and computes."""

    weights: str  # "fp32", "fp16", "bf16", "int8" or "int4"
    compute: np.dtype  # F32, F16 or BF16: matmuls, attention, KV cache
    residual: np.dtype  # F32, F16 or BF16: the residual stream and the norms' outputs feeding it
    block_size: int = 32  # int8/int4: MatMulNBits' block (the tied embedding table's, and `kernel`'s default)
    accuracy_level: int = 0  # int8/int4: 4 lets CPU kernels use int8 activations
    kernel: quantize.Kernel | None = None  # int8/int4: the linear layers' (default: MatMulNBits, block_size)
    prefill_kernel: quantize.Kernel | None = None  # a different one: the decoder_prefill graph's
    transposed: bool = False  # fp32/fp16/bf16: linear weights stored [N, K] and multiplied by FusedMatMul transB=1
    # int8/int4 on the CPU: per kernel name, how each site's input is fed (export/linear.py; default as it is)
    sites: dict[str, dict[str, SitePlan]] = field(default_factory=dict)

    @property
    def compute_dtype(self) -> str:
        """"float32", "float16" or "bfloat16": the KV cache's and the matmuls' element type."""
        return self.compute.name

    @property
    def linear_kernel(self) -> quantize.Kernel:
        """The kernel of the decoder graph's linear layers (int8/int4)."""
        return self.kernel or self.table_kernel

    @property
    def table_kernel(self) -> quantize.Kernel:
        """The tied embedding / lm_head table's: MatMulNBits (GatherBlockQuantized reads the same blob)."""
        return quantize.nbits(self.weights, self.block_size)

    def site(self, kernel: quantize.Kernel, name: str) -> SitePlan:
        """How the input `name` ("layers.N.qkv", ".o", ".mlp", ".down") is fed to `kernel`."""
        return self.sites.get(kernel.name, {}).get(name, PLAIN)

    @classmethod
    def for_level(cls, level: str, device: str, gemma2: bool, block_size: int,
                  kernel: quantize.Kernel | None = None, prefill_kernel: quantize.Kernel | None = None,
                  transposed: bool = False, sites: dict[str, dict[str, SitePlan]] | None = None) -> Precision:
        if transposed and level in quantize.BITS:
            raise ValueError("int8/int4 weights have their kernel's own layout: [N, K] applies to fp32/fp16/bf16")
        half = level == "fp16" or (level in quantize.BITS and device == "cuda")
        compute = BF16 if level == "bf16" else F16 if half else F32
        residual = F32 if (compute == F32 or (compute == F16 and gemma2)) else compute
        accuracy = quantize.CPU_ACCURACY_LEVEL if device == "cpu" else 0
        if device != "cpu" and any(k and k.cpu_only for k in (kernel, prefill_kernel)):
            raise ValueError(f"{device} folders cannot use CPU-only kernels")
        prefill = prefill_kernel if prefill_kernel != kernel else None
        return cls(level, compute, residual, block_size, accuracy, kernel, prefill, transposed, sites or {})


class DecoderWeights(Protocol):
    """Where the builder reads weights: float arrays in transformers' layouts."""

    def embedding(self) -> np.ndarray:
        """[vocab, hidden], also the tied lm_head."""

    def linear(self, layer: int, name: str) -> np.ndarray:
        """[out, in] of q, k, v, o, gate, up or down."""

    def norm(self, layer: int | None, name: str) -> np.ndarray:
        """The raw Gemma norm weight w (the gain is 1 + w); layer None for the final norm."""

    def rotary(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [positions, head_dim / 2] float32 for positions 1 .. positions."""


def build_decoder(folder: Path, config: DecoderConfig, precision: Precision,
                  source: DecoderWeights) -> dict[str, GraphInfo]:
    """Write the decoder graph (for Gemma 2 also the windowed one, and with a prefill kernel of its own the
    prefill one) with their shared weights file."""
    weights = Weights(folder / data_file(GRAPH_FILES[DECODER]))
    roles = [DECODER] + [DECODER_WINDOWED] * config.gemma2 + [DECODER_PREFILL] * bool(precision.prefill_kernel)
    graphs = {}
    try:
        for role in roles:
            builder = GraphBuilder(weights)
            kernel = precision.prefill_kernel if role == DECODER_PREFILL else None
            _DecoderGraph(builder, config, precision, source, windowed=role == DECODER_WINDOWED,
                          kernel=kernel).build()
            builder.save(folder / GRAPH_FILES[role], quantize.OPSET)
            io = graph_io(role, config.layers)
            graphs[role] = GraphInfo(file=GRAPH_FILES[role], inputs=io.inputs, outputs=io.outputs)
    finally:
        weights.close()
    return graphs


class _DecoderGraph:
    """Builds one decoder graph into a GraphBuilder (see the module docstring for its structure)."""

    def __init__(self, g: GraphBuilder, config: DecoderConfig, precision: Precision, source: DecoderWeights,
                 windowed: bool, kernel: quantize.Kernel | None = None):
        self.g, self.c, self.p, self.src, self.windowed = g, config, precision, source, windowed
        self.kernel = kernel  # the linear layers' (int8/int4; default: the precision's)

    def build(self) -> None:
        c, p, g = self.c, self.p, self.g
        io = DecoderIO(c.layers)
        g.input(io.input_ids, np.int64, ["batch", "sequence"])
        g.input(io.image_features, F32, ["images", "image_tokens", c.hidden])
        g.input(io.seqlens_k, np.int32, ["batch"])
        g.input(io.total_sequence_length, np.int32, [])
        g.input(io.last_index, np.int64, ["batch"])
        cache = ["batch", c.kv_heads, "max_len", c.head_dim]
        for pair in io.caches:
            g.input(pair.past, p.compute, cache)
        g.output(io.logits, F32, ["batch", c.vocab])
        g.output(io.next_token, np.int64, ["batch"])
        for pair in io.caches:
            g.output(pair.present, p.compute, cache)

        cos, sin = self._rotary_tables()
        hidden, skip = self._embed(io.input_ids, io.image_features), None
        for i in range(c.layers):
            key, value = io.caches[2 * i : 2 * i + 2]
            hidden, skip = self._layer(i, hidden, skip, io.seqlens_k, io.total_sequence_length, cos, sin,
                                       (key, value))
        assert skip is not None
        self._head(hidden, skip, io)

    # --- pieces -------------------------------------------------------------------------------------

    def _embed(self, ids: str, features: str) -> str:
        """Text embeddings (x sqrt(hidden)); where ids < 0, the image feature row -1 - id instead."""
        g, p, c = self.g, self.p, self.c
        zero = g.constant("embed/zero", 0, np.int64)
        safe = g.op("Max", [ids, zero], "embed/ids")[0]
        if p.weights in quantize.BITS:
            table, scales = self._quantized_embedding()
            flat = g.op("Reshape", [table, g.constant("embed/rows", [c.vocab, -1], np.int64)], "embed/table")[0]
            text = g.op("GatherBlockQuantized", [flat, safe, scales], "embed/gather", domain="com.microsoft",
                        gather_axis=0, quantize_axis=1, block_size=p.table_kernel.block_size,
                        bits=p.table_kernel.bits)[0]
        else:
            text = g.op("Gather", [self._embedding(), safe], "embed/gather")[0]
        text = g.op("Mul", [text, g.constant("embed/scale", c.hidden**0.5, p.compute)], "embed/scale")[0]
        text = self._cast(text, p.compute, p.residual, "embed/cast")
        rows = g.op("Reshape", [features, g.constant("image/rows", [-1, c.hidden], np.int64)], "image/rows")[0]
        index = g.op("Sub", [g.constant("image/minus_one", -1, np.int64), ids], "image/index")[0]
        index = g.op("Max", [index, zero], "image/safe_index")[0]
        image = g.op("Gather", [rows, index], "image/gather")[0]
        image = self._cast(image, F32, p.residual, "image/cast")
        is_image = g.op("Less", [ids, zero], "embed/is_image")[0]
        is_image = g.op("Unsqueeze", [is_image, g.constant("embed/last_axis", [-1], np.int64)], "embed/mask")[0]
        return g.op("Where", [is_image, image, text], "embed/merge")[0]

    def _layer(self, i: int, hidden: str, skip: str | None, seqlens: str, total: str, cos: str, sin: str,
               caches: tuple[CacheIO, CacheIO]) -> tuple[str, str]:
        c, p, g = self.c, self.p, self.g
        name = f"layers.{i}"
        if skip is None:
            x = self._norm(hidden, self._gain(i, "input_layernorm", p.compute), f"{name}/input_norm")
        else:
            x, hidden = self._skip_norm(hidden, skip, self._gain(i, "input_layernorm", p.residual),
                                        f"{name}/input_norm")
            x = self._cast(x, p.residual, p.compute, f"{name}/input_norm_cast")
        qkv = self._linear(self._input(x, i, "qkv"), i, ("q", "k", "v"), f"{name}/qkv")
        sliding_here = self.windowed and c.sliding and c.sliding[i]
        key, value = caches
        attn = g.op("GroupQueryAttention", [qkv, "", "", key.past, value.past, seqlens, total, cos, sin],
                    f"{name}/attn", outputs=[f"{name}/attn/0", key.present, value.present], domain="com.microsoft",
                    num_heads=c.heads, kv_num_heads=c.kv_heads, scale=c.scale, softcap=c.attn_softcap,
                    do_rotary=1, rotary_interleaved=0, causal=int(bool(sliding_here)),
                    local_window_size=c.window if sliding_here else -1)[0]
        out = self._linear(self._input(attn, i, "o"), i, ("o",), f"{name}/o_proj")
        pre_mlp = "post_attention_layernorm"
        if c.gemma2:
            out = self._norm(out, self._gain(i, "post_attention_layernorm", p.residual), f"{name}/post_attention_norm")
            pre_mlp = "pre_feedforward_layernorm"
        x, hidden = self._skip_norm(hidden, out, self._gain(i, pre_mlp, p.residual), f"{name}/pre_mlp_norm")
        x = self._cast(x, p.residual, p.compute, f"{name}/pre_mlp_norm_cast")
        mlp_input = self._input(x, i, "mlp")
        gate = self._linear(mlp_input, i, ("gate",), f"{name}/gate_proj")
        up = self._linear(mlp_input, i, ("up",), f"{name}/up_proj")
        gate = g.op("Gelu", [gate], f"{name}/gelu", approximate="tanh")[0]
        down_input = self._input(g.op("Mul", [gate, up], f"{name}/gate_up")[0], i, "down")
        mlp = self._linear(down_input, i, ("down",), f"{name}/down_proj")
        if c.gemma2:
            mlp = self._norm(mlp, self._gain(i, "post_feedforward_layernorm", p.residual),
                             f"{name}/post_feedforward_norm")
        return hidden, mlp

    def _head(self, hidden: str, skip: str, io: DecoderIO) -> None:
        """Final norm, the last real position of each row, the tied lm_head, soft-capping, argmax."""
        c, p, g = self.c, self.p, self.g
        normed, _ = self._skip_norm(hidden, skip, self._gain(None, "norm", p.residual), "head/norm")
        rows = g.op("Reshape", [normed, g.constant("head/rows", [-1, c.hidden], np.int64)], "head/rows")[0]
        x = g.op("Gather", [rows, io.last_index], "head/last")[0]
        x = self._cast(x, p.residual, p.compute, "head/cast_in")
        # the last node writes the graph's logits output itself (an Identity would copy [b, vocab] every step)
        final: list[str] | int = [io.logits] if p.compute == F32 else 1  # what the last float node writes
        head_out = final if not c.final_softcap else 1
        if p.weights in quantize.BITS:
            table, scales = self._quantized_embedding()
            op_type, attributes = p.table_kernel.operator(c.hidden, c.vocab, p.accuracy_level)
            logits = g.op(op_type, [x, table, scales], "head/lm_head", head_out, domain="com.microsoft",
                          **attributes)[0]
        else:
            logits = g.op("Gemm", [x, self._embedding()], "head/lm_head", head_out, transB=1)[0]
        if c.final_softcap:
            cap = g.constant("head/softcap", c.final_softcap, p.compute)
            logits = g.op("Div", [logits, cap], "head/softcap_div")[0]
            logits = g.op("Tanh", [logits], "head/softcap_tanh")[0]
            logits = g.op("Mul", [logits, cap], "head/softcap_mul", final)[0]
        if p.compute != F32:
            g.op("Cast", [logits], "head/logits", outputs=[io.logits], to=1)
        g.op("ArgMax", [io.logits], "head/argmax", outputs=[io.next_token], axis=-1, keepdims=0)

    # --- building blocks ---------------------------------------------------------------------------

    def _norm(self, x: str, gain: str, name: str) -> str:
        """RMSNorm; its output takes the gain's type (input and output types may differ)."""
        return self.g.op("SimplifiedLayerNormalization", [x, gain], name, axis=-1, epsilon=self.c.eps,
                         stash_type=1)[0]

    def _skip_norm(self, hidden: str, skip: str, gain: str, name: str) -> tuple[str, str]:
        """(RMSNorm(hidden + skip), hidden + skip), all in the residual type."""
        normed, _, _, total = self.g.op("SkipSimplifiedLayerNormalization", [hidden, skip, gain], name,
                                        outputs=[f"{name}/0", "", "", f"{name}/3"], domain="com.microsoft",
                                        epsilon=self.c.eps)
        return normed, total

    def _cast(self, x: str, have: Any, want: Any, name: str) -> str:
        if have == want:
            return x
        return self.g.op("Cast", [x], name, to=helper.np_dtype_to_tensor_dtype(np.dtype(want)))[0]

    def _gain(self, layer: int | None, norm: str, dtype: Any) -> str:
        """Gemma's RMSNorm gain 1 + w, computed in float32 as transformers does, stored in `dtype`."""
        key = "norm" if layer is None else f"layers.{layer}.{norm}"
        return self.g.weight(f"{key}.gain_{np.dtype(dtype).name}",
                             lambda: (1.0 + self.src.norm(layer, norm).astype(F32)).astype(dtype))

    def _input(self, x: str, layer: int, site: str) -> str | LinearInput:
        """The input `x` of the layer's linear site ("qkv", "o", "mlp" or "down"): for int8/int4 a LinearInput
        that feeds it to the kernel as the precision's plan for the site says."""
        if self.p.weights not in quantize.BITS:
            return x
        kernel = self.kernel or self.p.linear_kernel
        k = self.c.heads * self.c.head_dim if site == "o" else self.c.intermediate if site == "down" else self.c.hidden
        name = f"layers.{layer}.{site}"
        return LinearInput(self.g, x, k, kernel, self.p.site(kernel, name), self.p.accuracy_level, f"{name}/input")

    def _linear(self, x: str | LinearInput, layer: int, parts: tuple[str, ...], name: str) -> str:
        """x @ W.T for the named linear layers of `layer`, concatenated along the output (packed QKV)."""
        p, g = self.p, self.g

        def weight() -> np.ndarray:
            return np.concatenate([self.src.linear(layer, part) for part in parts], axis=0)

        key = f"layers.{layer}.{'_'.join(parts)}"
        if isinstance(x, LinearInput):
            n = sum(self.c.linear_shape(part)[0] for part in parts)
            cached: dict[str, np.ndarray] = {}

            def float_weight() -> np.ndarray:  # read once for the quantized and the outlier weights
                if not cached:
                    cached["w"] = weight()
                return cached["w"]

            return x.product(lambda kernel: self._quantized(key, float_weight, kernel), float_weight, n, key, name)
        if p.transposed:  # [N, K]: each output a contiguous row's dot product
            w = g.weight(f"{key}.weight_nk", lambda: weight().astype(p.compute))
            return g.op("FusedMatMul", [x, w], name, domain="com.microsoft", transB=1)[0]
        w = g.weight(f"{key}.weight", lambda: weight().T.astype(p.compute))
        return g.op("MatMul", [x, w], name)[0]

    def _quantized(self, key: str, weight: Any, kernel: quantize.Kernel) -> tuple[str, str]:
        """The quantized weight and scales of a [N, K] weight on `kernel` (quantized once, shared by every
        graph on the same kernel)."""
        p, g = self.p, self.g
        blobs: dict[str, np.ndarray] = {}

        def quantized(part: str) -> np.ndarray:
            if not blobs:
                blobs["packed"], scales = kernel.arrays(weight())
                # MatMulIntegerToFloat takes float32 scales; MatMulNBits the compute type
                blobs["scales"] = scales.astype(F32 if kernel.op == "qgemm" else p.compute)
            return blobs[part]

        # named as before for MatMulNBits at the table's block size (folders stay byte-identical)
        suffix = "" if kernel == p.table_kernel else f".{kernel.name}"
        packed = g.weight(f"{key}.q{kernel.bits}{suffix}", lambda: quantized("packed"))
        return packed, g.weight(f"{key}.scales{suffix}", lambda: quantized("scales"))

    def _quantized_embedding(self) -> tuple[str, str]:
        """One quantized table for the embedding (GatherBlockQuantized) and the tied lm_head (MatMulNBits)."""
        return self._quantized("embed_tokens", self.src.embedding, self.p.table_kernel)

    def _embedding(self) -> str:
        return self.g.weight("embed_tokens.weight", lambda: self.src.embedding().astype(self.p.compute))

    def _rotary_tables(self) -> tuple[str, str]:
        tables: dict[str, np.ndarray] = {}

        def table(which: str) -> np.ndarray:
            if not tables:
                tables["cos"], tables["sin"] = self.src.rotary(self.c.max_positions)
            return tables[which].astype(self.p.compute)

        return (self.g.weight("rotary.cos", lambda: table("cos")), self.g.weight("rotary.sin", lambda: table("sin")))

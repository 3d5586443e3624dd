"""How linear layers are quantized: the kernels a matrix product can run on, and their weights.

Two formulations (`Kernel`):

- `nbits` (MatMulNBits): weight-only block quantization, `bits` (4 or 8) per weight, symmetric, one scale
  per block of `block_size` along K (onnxruntime's own blockwise quantizer). Runs on the CPU (with
  accuracy_level 4 its kernels quantize the activations to int8 per block) and on CUDA. The same blob
  serves GatherBlockQuantized, so the decoder's tied embedding is stored once.
- `qgemm` (MatMulIntegerToFloat): int8 weights with one scale per output column, times the activations
  quantized to int8 per row at run time (export/linear.py writes those nodes): onnxruntime's integer GEMM
  (MLAS QGEMM, VNNI where the CPU has it, AMX on Xeons). CPU only: it must never reach a folder built for
  CUDA (it would run on the CPU there).

This module is the kernel math only. `export/graph_quantize.py` applies a kernel to every MatMul by a constant
weight of an exported graph (the vision encoder); the decoder builder (export/decoder.py) quantizes each weight
through `Kernel.arrays`; both write the products through export/linear.py, which also keeps outlier channels
out of the int8 activations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

OPSET = 21
BITS = {"int8": 8, "int4": 4}
# accuracy_level 4: MatMulNBits may compute with int8 activations (VNNI / AVX-512 on CPU), the fast path on
# x86; the CUDA kernels ignore the attribute (0 is written for CUDA-targeted folders).
CPU_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class Kernel:
    """One formulation of a linear layer: "nbits" (MatMulNBits) or "qgemm" (MatMulIntegerToFloat)."""

    op: str
    bits: int
    block_size: int = 0  # nbits only

    @property
    def name(self) -> str:
        """"nbits4-b32", "nbits8-b128", "qgemm8": how manifests and the CLI spell it."""
        return f"nbits{self.bits}-b{self.block_size}" if self.op == "nbits" else f"qgemm{self.bits}"

    @classmethod
    def parse(cls, name: str) -> Kernel:
        match = re.fullmatch(r"nbits([48])-b(\d+)|qgemm(8)", name)
        if not match:
            raise ValueError(f"unknown kernel {name!r}: nbitsB-bN (B 4 or 8, N a block size) or qgemm8")
        if match[3]:
            return cls("qgemm", 8)
        return cls("nbits", int(match[1]), int(match[2]))

    @property
    def cpu_only(self) -> bool:
        return self.op == "qgemm"

    def arrays(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, K] float weight -> (quantized weight, float32 scales) in the operator's layouts."""
        if self.op == "qgemm":
            return quantize_columns(weight)
        return quantize_blocks(weight, self.bits, self.block_size)

    def operator(self, k: int, n: int, accuracy_level: int) -> tuple[str, dict[str, Any]]:
        """(op_type, attributes) of the MatMulNBits node computing x @ W.T with inputs [x, quantized, scales]
        (QGEMM products are written by export/linear.py: they need their activations quantized first)."""
        assert self.op == "nbits", "QGEMM is written by export.linear.LinearInput"
        return "MatMulNBits", dict(K=k, N=n, bits=self.bits, block_size=self.block_size,
                                   accuracy_level=accuracy_level)


def nbits(level: str, block_size: int) -> Kernel:
    """The MatMulNBits kernel of an int8/int4 level."""
    return Kernel("nbits", BITS[level], block_size)


QGEMM = Kernel("qgemm", 8)


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float weight -> (blob uint8 [N, K/block, block*bits/8], scales float32 [N, K/block]).

    Symmetric (the zero point is the default 2^(bits-1)); K is zero-padded to whole blocks. Computed by
    onnxruntime's C++ quantizer, the one its MatMulNBits tooling uses.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight.shape
    blocks = -(-k // block_size)
    columns = np.zeros((blocks * block_size, n), dtype=np.float32)  # the quantizer reads [K, N]
    columns[:k] = weight.T
    packed = np.zeros((n, blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), dtype=np.uint8)  # unused when symmetric
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, columns, scales, zero_points, block_size, n, blocks * block_size, True)
    return packed, scales


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float weight -> (int8 [K, N], scales float32 [N]): symmetric, one scale per output column,
    values in -127 .. 127 (MatMulIntegerToFloat's B and b_scale)."""
    weight = weight.astype(np.float32, copy=False)
    peak = np.abs(weight).max(axis=1)
    scales = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scales[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(quantized.T), scales

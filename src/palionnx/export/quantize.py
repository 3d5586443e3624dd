"""Weight-only quantization of exported graphs with onnxruntime's tools.

- MatMul weights -> `MatMulNBits` (4 or 8 bits, blockwise along K), onnxruntime's MatMulNBitsQuantizer.
  Unlike `quantize_dynamic` (MatMulInteger), MatMulNBits runs on the CUDA provider too.
- The embedding table -> `GatherBlockQuantized`: 4 bits by the same quantizer; 8 bits, which that
  quantizer does not do for Gather, by `quantize_gather_int8` below (symmetric blocks, zero point 128).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
# accuracy_level 4: MatMulNBits may compute with int8 activations (VNNI / AVX-512 on CPU), which is the
# fast path on x86; the CUDA kernels ignore the attribute.
ACCURACY_LEVEL = 4


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in one `<name>.data` file beside the graph (needed past 2 GB)."""
    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


def quantize_graph(src: Path, dst: Path, level: str, block_size: int, gather: bool) -> None:
    """Write `dst`: `src` with its MatMul weights (and with `gather`, its embedding table) quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = BITS[level]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    op_types = ("MatMul", "Gather") if (gather and bits == 4) else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
        op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    model = quantizer.model.model
    del quantizer
    if gather and bits == 8:
        quantize_gather_int8(model, block_size)
    save_model(model, dst)


def quantize_gather_int8(model: onnx.ModelProto, block_size: int) -> None:
    """Replace each Gather over a float initializer by an 8-bit GatherBlockQuantized, in place."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        rows, cols = table.shape
        if cols % block_size:
            continue
        blocks = table.reshape(rows, cols // block_size, block_size)
        scales = np.abs(blocks).max(axis=-1) / 127.0
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
        name = node.input[0]
        graph.initializer.remove(inits[name])
        graph.initializer.extend([
            numpy_helper.from_array(q.astype(np.uint8).reshape(rows, cols), name + "_Q8"),
            numpy_helper.from_array(scales.astype(table.dtype), name + "_scales"),
        ])
        gather_axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        replacement = helper.make_node(
            "GatherBlockQuantized", [name + "_Q8", node.input[1], name + "_scales"], list(node.output),
            name=(node.name or "gather") + "_Q8", domain="com.microsoft",
            gather_axis=gather_axis, quantize_axis=1, block_size=block_size, bits=8,
        )
        graph.node.remove(node)
        graph.node.insert(index, replacement)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

"""Weight-only quantization of exported graphs with onnxruntime's tools.

- MatMul weights -> `MatMulNBits` (4 or 8 bits, blockwise along K), onnxruntime's MatMulNBitsQuantizer.
  Unlike `quantize_dynamic` (MatMulInteger), MatMulNBits runs on the CUDA provider too.
- The embedding table -> `GatherBlockQuantized`: 4 bits by the same quantizer; 8 bits, which that
  quantizer does not do for Gather, by `_gather_int8` below (symmetric blocks, zero point 128).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

BITS = {"int8": 8, "int4": 4}
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
    """Write `dst`: `src` with its MatMul weights (and with `gather`, its embedding table) quantized.

    Weights are streamed: the graph is read without its external data, and each weight is loaded,
    quantized by onnxruntime's DefaultWeightOnlyQuantizer in a scratch graph, and dropped, so memory holds
    one float weight at a time plus the quantized result (not the whole float model).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    bits = BITS[level]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer = DefaultWeightOnlyQuantizer(config)
    model = onnx.load(str(src), load_external_data=False)
    graph, base = model.graph, str(src.parent)
    weights = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for node in graph.node:
        name = {"MatMul": node.input[-1], "Gather": node.input[0] if gather else None}.get(node.op_type)
        if name not in weights:
            nodes.append(node)
            continue
        weight = onnx.TensorProto()
        weight.CopyFrom(weights[name])
        external_data_helper.load_external_data_for_tensor(weight, base)
        scratch = helper.make_graph([], "scratch", [], [], initializer=[weight])
        if node.op_type == "Gather" and bits == 8:
            replacement = [_gather_int8(node, weight, block_size, scratch)]
        else:
            replacement = quantizer.quantize(node, [graph, scratch])
        nodes.extend(replacement)
        for tensor in scratch.initializer:  # copied out, so the scratch graph and its float weight are freed
            if tensor.name != name:
                added.append(onnx.TensorProto())
                added[-1].CopyFrom(tensor)

    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    for init in kept:  # what stays float (norm gains, biases, conv) is small: load it for saving
        if external_data_helper.uses_external_data(init):
            external_data_helper.load_external_data_for_tensor(init, base)
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_model(model, dst)


def _gather_int8(node: onnx.NodeProto, weight: onnx.TensorProto, block_size: int,
                 scratch: onnx.GraphProto) -> onnx.NodeProto:
    """An 8-bit GatherBlockQuantized for a Gather over `weight` (symmetric blocks, zero point 128).

    onnxruntime's quantizer does Gather at 4 bits only; the layout here is the kernel's 8-bit one.
    """
    table = numpy_helper.to_array(weight)
    rows, cols = table.shape
    if cols % block_size:
        return node
    blocks = table.astype(np.float32).reshape(rows, cols // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    scales[scales == 0] = 1.0
    q = (np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128).astype(np.uint8)
    name = weight.name
    scratch.initializer.extend([
        numpy_helper.from_array(q.reshape(rows, cols), name + "_Q8"),
        numpy_helper.from_array(scales.astype(table.dtype), name + "_scales"),
    ])
    gather_axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return helper.make_node(
        "GatherBlockQuantized", [name + "_Q8", node.input[1], name + "_scales"], list(node.output),
        name=(node.name or "gather") + "_Q8", domain="com.microsoft",
        gather_axis=gather_axis, quantize_axis=1, block_size=block_size, bits=8,
    )

"""Weight-only block quantization (MatMulNBits), with onnxruntime's own blockwise quantizer.

`quantize_blocks` turns one [N, K] weight into MatMulNBits' blob and scales (symmetric, along K); the
decoder builder calls it per weight, and `quantize_graph` applies it to every MatMul of an exported graph
(the vision encoder). Unlike `quantize_dynamic` (MatMulInteger), MatMulNBits runs on the CUDA provider too.
The same blob serves GatherBlockQuantized, so the decoder's tied embedding is stored once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

OPSET = 21
BITS = {"int8": 8, "int4": 4}
# accuracy_level 4: MatMulNBits may compute with int8 activations (VNNI / AVX-512 on CPU), the fast path on
# x86; the CUDA kernels ignore the attribute (0 is written for CUDA-targeted folders).
CPU_ACCURACY_LEVEL = 4


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


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in one `<name>.data` file beside the graph (needed past 2 GB)."""
    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


def quantize_graph(src: Path, dst: Path, level: str, block_size: int, accuracy_level: int) -> None:
    """Write `dst`: `src` with every MatMul by a constant weight as MatMulNBits.

    Weights are streamed: the graph is read without its external data and each weight is loaded,
    quantized and dropped, so memory holds one float weight at a time plus the quantized results.
    """
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    bits = BITS[level]
    model = onnx.load(str(src), load_external_data=False)
    graph, base = model.graph, str(src.parent)
    weights = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for node in graph.node:
        name = node.input[-1]
        if node.op_type != "MatMul" or name not in weights or len(weights[name].dims) != 2:
            nodes.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(weights[name])
        external_data_helper.load_external_data_for_tensor(tensor, base)
        weight = numpy_helper.to_array(tensor)  # [K, N]
        packed, scales = quantize_blocks(weight.T.astype(np.float32), bits, block_size)
        added += [numpy_helper.from_array(packed, name + "_Q"),
                  numpy_helper.from_array(scales.astype(weight.dtype), name + "_scales")]
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], name + "_Q", name + "_scales"], list(node.output),
            name=(node.name or name) + "_Q", domain="com.microsoft", K=weight.shape[0], N=weight.shape[1],
            bits=bits, block_size=block_size, accuracy_level=accuracy_level,
        ))

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

"""Quantize an exported ONNX graph: every MatMul by a constant 2-D weight rewritten onto a kernel
(`export/quantize.py`) through `export/linear.py`, its weights streamed one at a time, the result saved with
its weights in one external-data file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .linear import PLAIN, LinearInput, SitePlan
from .onnx_builder import GraphBuilder, Weights
from .quantize import Kernel


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in one `<name>.data` file beside the graph (needed past 2 GB)."""
    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


def quantize_graph(src: Path, dst: Path, kernel: Kernel, accuracy_level: int,
                   plans: dict[str, SitePlan] | None = None) -> None:
    """Write `dst`: `src` with every MatMul by a constant weight on `kernel`, each input fed as `plans` says
    (by input tensor name; export/linear.py: outlier channels, float compute; default: as it is).

    Weights are streamed: the graph is read without its external data and each weight is loaded,
    quantized and dropped, so memory holds one float weight at a time plus the quantized results.
    """
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(src), load_external_data=False)
    graph, base = model.graph, str(src.parent)
    weights = {init.name: init for init in graph.initializer}
    g = GraphBuilder(Weights())
    sites: dict[str, LinearInput] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        x, name = node.input[0], node.input[-1]
        if node.op_type != "MatMul" or name not in weights or len(weights[name].dims) != 2:
            nodes.append(node)
            continue
        weight = load_initializer(weights[name], base).T.astype(np.float32)  # [N, K]
        n, k = weight.shape
        site = sites.get(x) or sites.setdefault(x, LinearInput(g, x, k, kernel, (plans or {}).get(x, PLAIN),
                                                               accuracy_level, f"{x}/int8"))
        def quantized(chosen: Kernel, name: str = name, weight: np.ndarray = weight) -> tuple[str, str]:
            packed, scales = chosen.arrays(weight)
            return g.weight(name + "_Q", lambda: packed), g.weight(name + "_scales", lambda: scales)

        def float_weight(weight: np.ndarray = weight) -> np.ndarray:
            return weight

        start = len(g.nodes)
        site.product(quantized, float_weight, n, name, (node.name or name) + "_Q", output=node.output[0])
        nodes += g.nodes[start:]

    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    for init in kept:  # what stays float (norm gains, biases, conv) is small: load it for saving
        if external_data_helper.uses_external_data(init):
            external_data_helper.load_external_data_for_tensor(init, base)
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    del graph.initializer[:]
    graph.initializer.extend(kept + [g.weights.tensors[name] for name in g.used])
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_model(model, dst)


def load_initializer(init: onnx.TensorProto, base: str) -> np.ndarray:
    """An initializer of a graph read without its external data, as an array (its data read from `base`)."""
    tensor = onnx.TensorProto()
    tensor.CopyFrom(init)
    external_data_helper.load_external_data_for_tensor(tensor, base)
    return numpy_helper.to_array(tensor)

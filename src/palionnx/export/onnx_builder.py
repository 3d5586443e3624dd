"""A small ONNX graph writer: nodes by name, weights streamed to one external-data file as they are added.

Writing each weight to disk when it is added (instead of holding the whole model as TensorProtos and
saving at the end) keeps export memory at one weight at a time. Two graphs built with the same `Weights`
share its data file: each weight is stored once on disk even when both graphs use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096  # data file offsets on page boundaries, so onnxruntime can map weights directly
INLINE_BYTES = 1024  # smaller tensors stay inside the graph file


class Weights:
    """One external-data file and the initializers written to it, by name (with no path: all kept inside
    the graph, for small graphs built in memory)."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.file = open(path, "wb") if path else None  # noqa: SIM115 (closed by close(), after every graph)
        self.tensors: dict[str, TensorProto] = {}

    def add(self, name: str, make: Callable[[], np.ndarray]) -> str:
        """Store the array `make()` returns under `name` (once: a second add of the name reuses it)."""
        if name not in self.tensors:
            array = np.ascontiguousarray(make())
            if array.nbytes <= INLINE_BYTES or self.file is None:
                self.tensors[name] = numpy_helper.from_array(array, name)
            else:
                self.tensors[name] = self._write(name, array)
        return name

    def _write(self, name: str, array: np.ndarray) -> TensorProto:
        assert self.file is not None and self.path is not None
        offset = -self.file.tell() % ALIGN + self.file.tell()
        self.file.seek(offset)
        self.file.write(array.tobytes())
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        if self.file:
            self.file.close()


class GraphBuilder:
    """Collects nodes, inputs and outputs of one graph; weights go through a shared `Weights`."""

    def __init__(self, weights: Weights):
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.used: list[str] = []

    def weight(self, name: str, make: Callable[[], np.ndarray]) -> str:
        """An initializer (written once, shared between graphs)."""
        if name not in self.used:
            self.used.append(name)
        return self.weights.add(name, make)

    def constant(self, name: str, value: Any, dtype: Any) -> str:
        """A small constant initializer."""
        return self.weight(name, lambda: np.asarray(value, dtype=dtype))

    def input(self, name: str, dtype: Any, shape: list[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
        return name

    def output(self, name: str, dtype: Any, shape: list[Any]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                          shape))

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attributes: Any) -> list[str]:
        """Add a node named `name`; returns its output names (`name/0`, ... unless given)."""
        names = outputs if isinstance(outputs, list) else [f"{name}/{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attributes))
        return names

    def model(self, name: str, opset: int) -> onnx.ModelProto:
        """The graph as a model (its large weights in the data file, if it has one)."""
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs,
                                  initializer=[self.weights.tensors[name] for name in self.used])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="palionnx")
        model.ir_version = 10
        return model

    def save(self, path: Path, opset: int) -> None:
        """Write the graph file (its weights are already in the data file)."""
        onnx.save_model(self.model(path.stem, opset), str(path))

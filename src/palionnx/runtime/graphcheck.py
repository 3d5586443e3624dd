"""Does the manifest describe the graphs it sits beside? Checked when the sessions open, so a manifest
edited by hand (or damaged) is one ModelFolderError at load, not a failure in the middle of a run.

Names: each graph's inputs and outputs are the manifest's, which are the contract's. Shapes: every static
dimension of a known tensor matches the manifest (image size, image tokens, hidden width, KV heads and head
size, vocabulary) and the KV cache has the manifest's element type. Symbolic dimensions, and tensors this
table does not know, are not checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .contract import graph_io
from .manifest import Manifest

# tensor name pattern -> the dimensions the manifest fixes (None: not fixed by the manifest).
Dims = Callable[[Manifest], list[int | None]]
EXPECTED_DIMS: dict[str, Dims] = {
    r"pixel_values": lambda m: [None, 3, m.image_size, m.image_size],
    r"image_features": lambda m: [None, m.image_seq_length, m.hidden],
    r"(past_key_values|present)\.\d+\.(key|value)": lambda m: [None, m.kv_heads, None, m.head_dim],
    r"logits": lambda m: [None, m.vocab_size],
}
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}


def graph_problems(m: Manifest, sessions: dict[str, Any]) -> list[str]:
    """Disagreements between the manifest and the opened graphs (onnxruntime sessions by role)."""
    problems = []
    for role, session in sessions.items():
        info = m.graphs[role]
        contract = graph_io(role, m.layers)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if [i.name for i in inputs] != info.inputs or info.inputs != contract.inputs:
            problems.append(f"the {role} graph's inputs are not those palionnx.json lists for {m.layers} layers")
        if [o.name for o in outputs] != info.outputs or info.outputs != contract.outputs:
            problems.append(f"the {role} graph's outputs are not those palionnx.json lists for {m.layers} layers")
        for tensor in [*inputs, *outputs]:
            problems += _tensor_problems(m, role, tensor)
    return problems


def _tensor_problems(m: Manifest, role: str, tensor: Any) -> list[str]:
    for pattern, dims in EXPECTED_DIMS.items():
        if not re.fullmatch(pattern, tensor.name):
            continue
        expected = dims(m)
        actual = list(tensor.shape)
        if len(actual) != len(expected) or any(
            isinstance(a, int) and e is not None and a != e for a, e in zip(actual, expected)
        ):
            return [f"the {role} graph's {tensor.name} has shape {actual}, palionnx.json implies {expected}"]
        if pattern.startswith("(past") and tensor.type != _ORT_TYPES[m.kv_dtype]:
            return [f"the {role} graph's {tensor.name} is {tensor.type}, palionnx.json says kv_dtype {m.kv_dtype}"]
    return []

"""`palionnx.json`: everything the runtime needs to know about an exported model folder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: decoder over a preallocated KV cache (past_length input)
MANIFEST_NAME = "palionnx.json"
TOKENIZER_NAME = "tokenizer.json"
QUANT_LEVELS = ("fp32", "fp16", "int8", "int4")


class ModelFolderError(Exception):
    """The model folder is missing, incomplete or from an incompatible palionnx version."""


@dataclass
class GraphInfo:
    """One ONNX graph of the folder: its file and the names of its inputs and outputs."""

    file: str
    inputs: list[str]
    outputs: list[str]


@dataclass
class Manifest:
    """The contents of `palionnx.json`."""

    family: str  # "pg1" (Gemma) or "pg2" (Gemma 2)
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    resample: str  # Pillow resampling filter name, e.g. "bicubic"
    rescale_factor: float
    image_seq_length: int
    image_token_id: int
    bos_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int
    prompt_template: str  # "{image}{bos}{prompt}\n": {image} is image_seq_length image tokens
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab_size: int
    sliding_window: int | None
    quant: dict[str, Any]  # level, and for int8/int4: bits, block_size, accuracy_level, symmetric
    kv_dtype: str  # "float32" or "float16"
    graphs: dict[str, GraphInfo]  # roles: "vision_encoder", "embed_tokens", "decoder"
    opset: int
    source: dict[str, Any] = field(default_factory=dict)  # id, revision
    palionnx_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def save(self, folder: str | Path) -> None:
        """Write the manifest atomically (it is the last file an export writes)."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read and check `palionnx.json` in `folder`."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ModelFolderError(
                f"{folder} is not a palionnx model folder (no {MANIFEST_NAME}); create one with `palionnx export`"
            )
        data = json.loads(path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ModelFolderError(
                f"{path} has schema version {data.get('schema_version')}, this palionnx reads {SCHEMA_VERSION}: "
                "export the model again"
            )
        data["graphs"] = {role: GraphInfo(**info) for role, info in data["graphs"].items()}
        manifest = cls(**data)
        for role, graph in manifest.graphs.items():
            if not (Path(folder) / graph.file).is_file():
                raise ModelFolderError(f"{folder}: the {role} graph {graph.file} is missing")
        if not (Path(folder) / TOKENIZER_NAME).is_file():
            raise ModelFolderError(f"{folder}: {TOKENIZER_NAME} is missing")
        return manifest

"""`palionnx.json`: everything the runtime needs to know about an exported model folder, typed and checked."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..version import __version__
from .contract import MANIFEST_NAME, READABLE_SCHEMAS, REQUIRED_GRAPHS, SCHEMA_VERSION, TOKENIZER_NAME
from .integrity import FileInfo, size_problems
from .levels import QUANT_LEVELS
from .preprocess import RESAMPLE, ImageSpec

FAMILIES = ("pg1", "pg2")
KV_DTYPES = ("float32", "float16", "bfloat16")
BUILT_FOR = ("cpu", "cuda")


class ModelFolderError(Exception):
    """The model folder is missing, incomplete, damaged or from an incompatible palionnx version."""


@dataclass
class GraphInfo:
    """One ONNX graph of the folder: its file and the names of its inputs and outputs."""

    file: str
    inputs: list[str]
    outputs: list[str]


@dataclass
class CpuKernels:
    """The matrix-product kernels of a CPU-built int8/int4 folder, how they were chosen, and how each linear
    layer's input is fed to them.

    Kernels are spelt "nbitsB-bN" (MatMulNBits, B bits, blocks of N along K; int8 activations per row and
    block) or "qgemm8" (int8 weights per column x activations quantized to int8 per row at run time,
    onnxruntime's integer GEMM).
    """

    vision: str  # the vision encoder's linear layers
    decode: str  # the decoder graph's linear layers: decode steps, and prefill when `prefill` is the same
    prefill: str  # the kernel prefill runs on; when it differs from `decode`, in the decoder_prefill graph
    chosen_by: str  # "measurement" (timed at export), "user" (export options) or "default" (not measured)
    cpu: str = ""  # the CPU that measured (model name, cores)
    # ms per layer of each candidate, as measured: prefill (the prompt's tokens), decode (one token, weights
    # from memory), batchM (M rows, weights from memory), vision (the image's tokens); and each checked
    # candidate's largest relative error on the calibration activations, fed to it as they are
    probe_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_error: dict[str, float] = field(default_factory=dict)
    batch_decode_from: int = 0  # decode steps of at least this many rows run on decoder_prefill (0: never)
    error_bound: float = 0.0  # the relative error activation quantization may add to a layer (0: not checked)
    calibration: str = ""  # the images the float model ran on at export
    # per graph role and site (a tensor linear layers read): outlier channels split off, float compute, and
    # the errors measured with and without the split (export/linear.py)
    sites: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # per "vision" / "decoder" and site: what its calibration activations looked like (export/calibrate.py)
    activations: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def site_counts(self, role: str) -> dict[str, int]:
        """Sites of a graph: in all, with outlier channels split off, computing in float."""
        sites = self.sites.get(role, {})
        return {"sites": len(sites), "split": sum(1 for s in sites.values() if s.get("outliers")),
                "float": sum(1 for s in sites.values() if s.get("float"))}

    def gain(self, phase: str, baseline: str) -> float | None:
        """How many times faster the chosen kernel ran `phase` than `baseline` did, if both were measured."""
        chosen = {"vision": self.vision, "prefill": self.prefill, "decode": self.decode}[phase]
        times = [self.probe_ms.get(kernel, {}).get(phase) for kernel in (baseline, chosen)]
        return times[0] / times[1] if times[0] and times[1] else None


@dataclass
class QuantInfo:
    """How the weights were stored. Fields that do not apply to a level are None (and left out of the file)."""

    level: str  # one of QUANT_LEVELS
    bits: int | None = None  # int8/int4: 8 or 4
    block_size: int | None = None  # int8/int4: weights per quantization block along K
    symmetric: bool | None = None  # int8/int4: no zero points
    accuracy_level: int | None = None  # int8/int4: MatMulNBits accuracy_level (4 = int8 activations on CPU)
    method: str | None = None  # int8/int4: the operators used, e.g. "MatMulNBits + GatherBlockQuantized"
    fp32_kept: list[str] | None = None  # fp16: the parts of the network kept in float32
    cpu_kernels: CpuKernels | None = None  # int8/int4 built for the CPU: the kernels chosen (see CpuKernels)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Manifest:
    """The contents of `palionnx.json`."""

    family: str  # "pg1" (Gemma decoder) or "pg2" (Gemma 2 decoder)
    image_size: int  # square input side in pixels
    image_mean: list[float]  # per-channel normalisation after rescaling
    image_std: list[float]
    resample: str  # Pillow resampling filter name, e.g. "bicubic"
    rescale_factor: float  # pixel values are multiplied by this (1/255) before normalising
    image_seq_length: int  # image tokens per image
    image_token_id: int
    bos_token_id: int
    eos_token_ids: list[int]  # any of these ends a caption
    pad_token_id: int
    prompt_template: str  # how a prompt becomes ids: {image} image tokens, {bos}, {prompt}, literal text
    layers: int  # decoder layers
    heads: int  # query heads
    kv_heads: int  # key/value heads
    head_dim: int
    hidden: int
    vocab_size: int
    max_positions: int  # the decoder's context: prompt + generated tokens never go beyond it
    sliding_window: int | None  # Gemma 2: window of the sliding layers; None for Gemma
    quant: QuantInfo
    device: str  # one of BUILT_FOR: what the graphs are built for (float32 compute on cpu, 16-bit on cuda)
    kv_dtype: str  # one of KV_DTYPES: the KV cache's (and the decoder's compute) element type
    graphs: dict[str, GraphInfo]  # by role (see contract.GRAPH_FILES); decoder_windowed for Gemma 2 only
    opset: int  # ONNX opset of the graphs
    source: dict[str, Any] = field(default_factory=dict)  # id and revision of the exported checkpoint
    files: dict[str, FileInfo] = field(default_factory=dict)  # every file but this one: size and SHA-256
    palionnx_version: str = ""  # the palionnx that exported the folder
    schema_version: int = SCHEMA_VERSION

    @property
    def image_spec(self) -> ImageSpec:
        """How images become this model's pixel values."""
        return ImageSpec(self.image_size, self.image_mean, self.image_std, self.rescale_factor, self.resample)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["quant"] = self.quant.to_json()
        return data

    def save(self, folder: str | Path) -> None:
        """Write the manifest atomically (it is the last file an export writes)."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read and check `palionnx.json` in `folder`; ModelFolderError names what is wrong."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ModelFolderError(
                f"{folder} is not a palionnx model folder (no {MANIFEST_NAME}); create one with `palionnx export`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFolderError(f"{path} is not valid JSON ({exc}): export the model again") from None
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path} must hold a JSON object: export the model again")
        _check_schema(path, data.get("schema_version"))
        try:
            manifest = _build(cls, data, str(path))
            manifest._check_fields(str(path))
        except ModelFolderError as exc:
            raise ModelFolderError(f"{exc}: {_remedy(data.get('palionnx_version'))}") from None
        manifest._check_files(Path(folder))
        return manifest

    def _check_fields(self, where: str) -> None:
        """Values the types alone do not rule out (the graphs are checked against these when loaded)."""
        positive = ("image_size", "image_seq_length", "layers", "heads", "kv_heads", "head_dim", "hidden",
                    "vocab_size", "max_positions")
        for name in positive:
            if getattr(self, name) < 1:
                raise ModelFolderError(f"{where}: {name} must be at least 1, not {getattr(self, name)}")
        if self.family not in FAMILIES:
            raise ModelFolderError(f"{where}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.resample not in RESAMPLE:
            raise ModelFolderError(f"{where}: resample {self.resample!r} is not one of {', '.join(RESAMPLE)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ModelFolderError(f"{where}: image_mean and image_std need 3 values each (std not 0)")
        tokens = {"image_token_id": [self.image_token_id], "bos_token_id": [self.bos_token_id],
                  "pad_token_id": [self.pad_token_id], "eos_token_ids": self.eos_token_ids}
        for name, ids in tokens.items():
            if not ids or any(not 0 <= i < self.vocab_size for i in ids):
                raise ModelFolderError(f"{where}: {name} {ids} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.image_token_id in (self.bos_token_id, self.pad_token_id):
            raise ModelFolderError(f"{where}: image_token_id {self.image_token_id} is also the bos or pad token")
        for placeholder in ("{image}", "{prompt}"):
            if self.prompt_template.count(placeholder) != 1:
                raise ModelFolderError(f"{where}: prompt_template must hold {placeholder} once")
        if self.quant.level not in QUANT_LEVELS:
            raise ModelFolderError(f"{where}: quant.level {self.quant.level!r} is not one of {', '.join(QUANT_LEVELS)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ModelFolderError(f"{where}: kv_dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if self.device not in BUILT_FOR:
            raise ModelFolderError(f"{where}: device {self.device!r} is not one of {', '.join(BUILT_FOR)}")
        missing = sorted(set(REQUIRED_GRAPHS) - set(self.graphs))
        if missing:
            raise ModelFolderError(f"{where}: graphs lacks {', '.join(missing)}")
        unlisted = sorted({TOKENIZER_NAME, *(g.file for g in self.graphs.values())} - set(self.files))
        if unlisted:
            raise ModelFolderError(f"{where}: files does not list {unlisted[0]}")

    def _check_files(self, folder: Path) -> None:
        """Every recorded file is there with its recorded size (a stat each; hashes: `info --verify`)."""
        problems = size_problems(folder, self.files)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ModelFolderError(f"{folder} is damaged: {problems[0]}{more}; copy, download or export it again")


def _remedy(written_by: object) -> str:
    """What to do about a manifest this palionnx cannot read: upgrade if a newer palionnx wrote it."""
    if isinstance(written_by, str) and _version_tuple(written_by) > _version_tuple(__version__):
        return f"it was written by palionnx {written_by}, newer than this one ({__version__}): upgrade palionnx"
    return "export the model again"


def _version_tuple(version: str) -> tuple[int, ...]:
    """"0.2.0rc1" -> (0, 2, 0): release numbers only."""
    return tuple(int(number) for number in re.findall(r"\d+", version.split("+")[0])[:3])


def _check_schema(path: Path, version: object) -> None:
    if version in READABLE_SCHEMAS:
        return
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ModelFolderError(
            f"{path} was written by a newer palionnx (schema {version}; this one reads {SCHEMA_VERSION}): "
            "upgrade palionnx"
        )
    raise ModelFolderError(
        f"{path} has schema version {version}, this palionnx reads {SCHEMA_VERSION}: export the model again"
    )


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Construct dataclass `cls` from JSON `data`, checking names and types; errors name the field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ModelFolderError(f"{where}: unknown field {unknown[0]!r}")
    values = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ModelFolderError(f"{where}: field {name!r} is missing")
            continue
        values[name] = _convert(hints[name], data[name], f"{where}: {name}")
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ModelFolderError(f"{where} must be an object")
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ModelFolderError(f"{where} must be a list")
        return [_convert(args[0], item, where) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ModelFolderError(f"{where} must be an object")
        return {key: _convert(args[1], item, f"{where}.{key}") for key, item in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ModelFolderError(f"{where} must be {hint.__name__}, not {type(value).__name__}")
    return value

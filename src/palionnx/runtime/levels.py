"""Quant levels and the device a folder is built for: one rule for `export`, `caption --model HUB_ID` and
the cache of first-use exports."""

from __future__ import annotations

from .providers import cuda_available

QUANT_LEVELS = ("fp32", "fp16", "bf16", "int8", "int4")
EXPORT_DEVICES = ("auto", "cpu", "cuda")


class LevelError(ValueError):
    """A quant level / device combination that cannot be built; the message says what to use."""


def target_device(quant: str, device: str) -> str:
    """The device a folder is built for: fp32 -> cpu, fp16 and bf16 -> cuda, int8/int4 -> `device` ("auto":
    CUDA when this onnxruntime offers it, else CPU)."""
    if quant not in QUANT_LEVELS:
        raise LevelError(f"unknown quant level {quant!r}: use auto or one of {', '.join(QUANT_LEVELS)}")
    if device not in EXPORT_DEVICES:
        raise LevelError(f"unknown device {device!r}: use one of {', '.join(EXPORT_DEVICES)}")
    implied = {"fp32": "cpu", "fp16": "cuda", "bf16": "cuda"}.get(quant)
    if implied and device not in ("auto", implied):
        why = {"fp32": "fp32 is the CPU level: onnxruntime's CUDA attention has no float32 kernel; for CUDA use "
                       "fp16, int8 or int4",
               "fp16": "fp16 is the CUDA level; for the CPU use fp32, int8 or int4",
               "bf16": "bf16 runs on CUDA only (onnxruntime's CPU attention has no bfloat16 kernel); for the CPU "
                       "use fp32, int8 or int4"}[quant]
        raise LevelError(f"--quant {quant} with --device {device}: {why}")
    if implied:
        return implied
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


def resolve_quant(quant: str, device: str) -> str:
    """"auto" -> fp16 when the folder will be built for CUDA, int4 for the CPU; other levels as given."""
    if quant != "auto":
        return quant
    return "fp16" if target_device("int4", device) == "cuda" else "int4"

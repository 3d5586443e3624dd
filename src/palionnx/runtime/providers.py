"""Which onnxruntime execution providers this build offers: the one fact both the device choice
(`sessions`) and the export levels (`levels`) need, with nothing else imported."""

from __future__ import annotations

import onnxruntime as ort

# The execution provider behind each accelerator device, and how a user gets it.
ACCELERATORS = {
    "cuda": ("CUDAExecutionProvider", "install the GPU extra: pip install 'palionnx[gpu]' (README, Install)"),
    "directml": ("DmlExecutionProvider", "on Windows, install onnxruntime-directml in place of onnxruntime"),
    "coreml": ("CoreMLExecutionProvider", "on macOS the standard wheel has it: pip install 'palionnx[cpu]'"),
}


def provider_available(device: str) -> bool:
    """Whether this onnxruntime build offers the execution provider of `device` ("cuda", "directml", ...)."""
    return ACCELERATORS[device][0] in ort.get_available_providers()


def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider."""
    return provider_available("cuda")

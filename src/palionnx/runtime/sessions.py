"""ONNX Runtime sessions: provider choice and session options."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

DEVICES = ("auto", "cuda", "cpu")


class DeviceError(Exception):
    """The requested device cannot be used."""


def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options shared by every graph.

    - intra-op threads = physical work per op; default all cores (onnxruntime's own default is the same
      on most machines, but containers often report fewer cores than the host: os.cpu_count() follows
      the affinity mask through sched_getaffinity).
    - ORT_ENABLE_ALL graph optimisation: fuses the decoder's norms, GELU and MatMul+Add patterns.
    - the CPU memory arena stays on: decode allocates the same shapes every step, which the arena reuses.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def providers_for(device: str) -> list[str]:
    """Execution providers for a device name ("auto", "cuda", "cpu")."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not cuda_available()):
        return ["CPUExecutionProvider"]
    if not cuda_available():
        raise DeviceError(
            "device='cuda' was asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(ort.get_available_providers())}). Install onnxruntime-gpu in place of "
            "onnxruntime (see the README's GPU section), or use device='cpu'."
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def open_session(path: str | Path, device: str, threads: int | None = None) -> ort.InferenceSession:
    """Create a session on `device`; asking for CUDA and silently getting CPU is an error."""
    providers = providers_for(device)
    if providers[0] == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # finds CUDA / cuDNN installed as pip packages (nvidia-*-cu12)
    session = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
    if providers[0] == "CUDAExecutionProvider" and "CUDAExecutionProvider" not in session.get_providers():
        if device == "auto":
            return ort.InferenceSession(str(path), sess_options=session_options(threads),
                                        providers=["CPUExecutionProvider"])
        raise DeviceError(
            f"CUDA was asked for but onnxruntime could not start it for {Path(path).name} "
            "(usually missing CUDA/cuDNN libraries: see onnxruntime's log with ORT_LOG_LEVEL=0)"
        )
    return session

"""ONNX Runtime sessions: one device for all of a model's graphs, and the session options."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

DEVICES = ("auto", "cuda", "cpu")
PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}


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


def requested_device(device: str) -> str:
    """"auto" -> "cuda" when this onnxruntime offers CUDA, else "cpu"; "cuda" without it is a DeviceError."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not cuda_available()):
        return "cpu"
    if not cuda_available():
        raise DeviceError(
            "device='cuda' was asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(ort.get_available_providers())}). Install onnxruntime-gpu in place of "
            "onnxruntime (see the README's GPU section), or use device='cpu'."
        )
    return "cuda"


def open_sessions(
    paths: dict[str, Path], device: str, threads: int | None = None, cuda_graph: set[str] | None = None
) -> tuple[dict[str, ort.InferenceSession], str]:
    """Open every graph in `paths` on one device and return the sessions with that device ("cuda" or "cpu").

    The device is decided once for the whole model: under "auto", if CUDA does not start for any graph, all
    graphs run on the CPU (never the vision encoder on one device and the decoder on another); an explicit
    "cuda" that does not start is a DeviceError, never a silent CPU run. On CUDA, the roles in `cuda_graph`
    get CUDA graph capture enabled (runs then choose per call with the `gpu_graph_id` run option).
    """
    resolved = requested_device(device)
    if resolved == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # finds CUDA / cuDNN installed as pip packages (nvidia-*-cu12)
        sessions = {role: _session(path, "cuda", threads, role in (cuda_graph or set()))
                    for role, path in paths.items()}
        failed = [path.name for role, path in paths.items()
                  if "CUDAExecutionProvider" not in sessions[role].get_providers()]
        if not failed:
            return sessions, "cuda"
        if device != "auto":
            raise DeviceError(
                f"CUDA was asked for but onnxruntime could not start it for {failed[0]} "
                "(usually missing CUDA/cuDNN libraries: see onnxruntime's log with ORT_LOG_LEVEL=0)"
            )
    return {role: _session(path, "cpu", threads) for role, path in paths.items()}, "cpu"


def _session(path: Path, device: str, threads: int | None, cuda_graph: bool = False) -> ort.InferenceSession:
    providers: list = list(PROVIDERS[device])
    if cuda_graph:
        providers[0] = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)

"""ONNX Runtime sessions: one device for all of a model's graphs, and the session options."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from ..system import cpu_count

if TYPE_CHECKING:
    from .manifest import Manifest

from .providers import ACCELERATORS, cuda_available, provider_available

DEVICES = ("auto", "cpu", "cuda", "directml", "coreml")


class DeviceError(Exception):
    """The requested device cannot be used."""


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options shared by every graph.

    - intra-op threads = physical work per op; default all cores (onnxruntime's own default is the same
      on most machines, but containers often allow fewer cores than the host has: `cpu_count` follows
      the affinity mask where the OS has one).
    - ORT_ENABLE_ALL graph optimisation: fuses the decoder's norms, GELU and MatMul+Add patterns.
    - the CPU memory arena stays on: decode allocates the same shapes every step, which the arena reuses.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or cpu_count()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def requested_device(device: str) -> str:
    """"auto" -> "cuda" when this onnxruntime offers CUDA, else "cpu"; an accelerator this onnxruntime
    lacks is a DeviceError that says how to get it (never a silent CPU run)."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device != "cpu" and not provider_available(device):
        provider, hint = ACCELERATORS[device]
        raise DeviceError(
            f"device {device!r} was asked for, but this onnxruntime has no {provider} "
            f"(available: {', '.join(ort.get_available_providers())}): {hint}; or use --device cpu"
        )
    return device


def open_sessions(
    paths: dict[str, Path], device: str, threads: int | None = None, manifest: Manifest | None = None,
    cuda_graph: set[str] | None = None,
) -> tuple[dict[str, ort.InferenceSession], str]:
    """Open every graph in `paths` on one device; return the sessions and where their buffers live
    ("cuda" for CUDA, "cpu" for the CPU, DirectML and CoreML, which take host buffers).

    The device is decided once for the whole model: under "auto", if CUDA does not start for any graph, all
    graphs run on the CPU (never the vision encoder on one device and the decoder on another); an explicit
    accelerator that does not start is a DeviceError, never a silent CPU run. With `manifest`, the graphs
    are checked against it (`palionnx.runtime.graphcheck`): a ModelFolderError when they disagree. On CUDA,
    the roles in `cuda_graph` get CUDA graph capture enabled (each run then says with the `gpu_graph_id` run
    option whether it is captured).
    """
    sessions, where = _open_on_device(paths, device, threads, cuda_graph or set())
    if manifest is not None:
        from .graphcheck import graph_problems
        from .manifest import ModelFolderError

        problems = graph_problems(manifest, sessions)
        if problems:
            folder = next(iter(paths.values())).parent
            raise ModelFolderError(f"{folder}: {problems[0]}; palionnx.json and the graphs disagree: copy or "
                                   "export the folder again")
    return sessions, where


def _open_on_device(
    paths: dict[str, Path], device: str, threads: int | None, cuda_graph: set[str]
) -> tuple[dict[str, ort.InferenceSession], str]:
    resolved = requested_device(device)
    if resolved != "cpu":
        if resolved == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # finds CUDA / cuDNN installed as pip packages (nvidia-*-cu12)
        sessions = {role: _session(path, resolved, threads, role in cuda_graph) for role, path in paths.items()}
        provider = ACCELERATORS[resolved][0]
        failed = [path.name for role, path in paths.items() if provider not in sessions[role].get_providers()]
        if not failed:
            return sessions, "cuda" if resolved == "cuda" else "cpu"
        if device != "auto":
            raise DeviceError(
                f"{resolved} was asked for but onnxruntime could not start {provider} for {failed[0]} "
                "(usually missing libraries: `palionnx doctor` names them)"
            )
    return {role: _session(path, "cpu", threads) for role, path in paths.items()}, "cpu"


def _session(path: Path, device: str, threads: int | None, cuda_graph: bool = False) -> ort.InferenceSession:
    """One graph's session; a graph onnxruntime cannot load is a ModelFolderError naming the file."""
    from .manifest import ModelFolderError

    providers: list = ["CPUExecutionProvider"] if device == "cpu" else [ACCELERATORS[device][0], "CPUExecutionProvider"]
    if device == "cuda" and cuda_graph:
        providers[0] = (ACCELERATORS["cuda"][0], {"enable_cuda_graph": "1"})
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (Fail, InvalidProtobuf, ...) share no base
        reason = " ".join(str(exc).split())[:300]
        raise ModelFolderError(f"onnxruntime cannot load {path} ({reason}): copy or export the folder again") from None

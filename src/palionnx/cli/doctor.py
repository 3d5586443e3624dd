"""`palionnx doctor`: what a user (or a bug report) needs when captioning is slow or fails.

Versions and onnxruntime flavour, execution providers and whether the requested one really starts (the
missing library when it does not), GPU, CPU and its instruction sets, RAM, caches and free disk, and the
--quant / --batch-size that suit this machine.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..system import CPU_FEATURES, Gpu, cpu_count, cpu_flags, cpu_name, memory, nvidia_gpus
from ..version import __version__
from .export_plan import free_disk
from .models import cache_root, cached_models
from .tables import human_bytes

GB = 1e9
# y = x + x at opset 13, 77 bytes (onnx.helper builds the same; tests/test_doctor.py checks): a graph every
# execution provider can run, to see whether the provider really starts.
PROBE_MODEL = bytes.fromhex(
    "0808120870616c696f6e6e783a390a0e0a01780a01781201792203416464120570726f62655a0f0a0178120a0a08080112040a0208"
    "01620f0a0179120a0a08080112040a02080142040a00100d"
)
FLAVOURS = {"onnxruntime": "CPU build", "onnxruntime-gpu": "CUDA build", "onnxruntime-directml": "DirectML build",
            "onnxruntime-openvino": "OpenVINO build", "onnxruntime-qnn": "QNN build"}
PROVIDERS = {"cuda": "CUDAExecutionProvider", "directml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider"}
# The int4 3B model (with its int8 prefill graph) peaks at 4.9 GB of RSS on the CPU at batch 1 and 7.1 GB at
# batch 32 (benchmarks/results/cpu-batch-pg1-3b-224-int4.md).
INT4_RSS_GB = 5.0
INT4_BATCH32_RSS_GB = 7.5


@dataclass
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the requested device cannot work: exit 1


def diagnose(device: str) -> Report:
    """The whole report for `--device device` (auto, cpu, cuda, directml, coreml)."""
    import onnxruntime as ort

    report = Report()
    report.rows += [("palionnx", __version__),
                    ("python", f"{platform.python_version()} ({sys.executable})"),
                    ("system", f"{platform.system()} {platform.release()} {platform.machine()}"),
                    ("onnxruntime", f"{ort.__version__}, {_flavours()}")]
    available = ort.get_available_providers()
    report.rows.append(("providers", ", ".join(available)))
    works = _check_accelerators(device, available, report)
    gpus = nvidia_gpus()
    report.rows += [("gpu", _describe_gpu(gpu)) for gpu in gpus] or [("gpu", "no NVIDIA GPU seen (nvidia-smi)")]
    flags = cpu_flags()
    report.rows += _cpu_rows(flags)
    ram = memory()
    available_ram = ram.available if ram and ram.available is not None else (ram.total if ram else None)
    report.rows.append(("ram", f"{ram.total / GB:.1f} GB, {(available_ram or 0) / GB:.1f} GB available"
                        if ram else "unknown"))
    report.rows += _storage_rows()
    free_gpu = gpus[0].memory_free_mb * 2**20 if gpus else None
    advice = recommend(works.get("cuda", False), free_gpu, available_ram, flags)
    if gpus and not works.get("cuda", False):
        advice += "; an NVIDIA GPU is here: pip install 'palionnx[gpu]' to caption on it"
    report.rows.append(("recommended", advice))
    return report


def _check_accelerators(device: str, available: list[str], report: Report) -> dict[str, bool]:
    """Try each accelerator this onnxruntime offers (and the requested one): does it start?"""
    works: dict[str, bool] = {}
    for name, provider in PROVIDERS.items():
        if provider not in available:
            if device == name:
                report.problems.append(f"--device {name}: this onnxruntime has no {provider} ({_how_to_get(name)})")
                report.rows.append((name, f"not in this onnxruntime build: {_how_to_get(name)}"))
            elif name == "cuda":
                report.rows.append((name, f"not in this onnxruntime build ({_how_to_get(name)})"))
            continue
        started, detail = provider_starts(provider)
        works[name] = started
        report.rows.append((name, "starts" if started else f"does not start: {detail}"))
        if device == name and not started:
            report.problems.append(f"--device {name}: {provider} does not start ({detail})")
    return works


def _how_to_get(name: str) -> str:
    return {"cuda": "pip install 'palionnx[gpu]'", "directml": "Windows: pip install onnxruntime-directml",
            "coreml": "macOS: pip install 'palionnx[cpu]'"}[name]


def provider_starts(provider: str) -> tuple[bool, str]:
    """Open a tiny graph on `provider` in a child process; (True, "") or (False, the reason: the missing
    library when onnxruntime names one)."""
    code = ("import sys, onnxruntime as ort\n"
            "if sys.argv[2] == 'CUDAExecutionProvider' and hasattr(ort, 'preload_dlls'): ort.preload_dlls()\n"
            "s = ort.InferenceSession(bytes.fromhex(sys.argv[1]), providers=[sys.argv[2], 'CPUExecutionProvider'])\n"
            "print('PROVIDER', s.get_providers()[0])\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, PROBE_MODEL.hex(), provider], capture_output=True,
                             text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return False, "no answer within 3 minutes"
    if f"PROVIDER {provider}" in out.stdout:
        return True, ""
    return False, failure_reason(out.stderr)


def failure_reason(log: str) -> str:
    """The missing library in onnxruntime's log, else its last error line."""
    missing = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", log)
    if missing:
        return f"missing library {missing.group(1)} (install 'palionnx[gpu]', which brings CUDA and cuDNN)"
    dll = re.search(r"([\w.+-]+\.dll)", log)
    if dll and "LoadLibrary" in log:
        return f"cannot load {dll.group(1)} (install 'palionnx[gpu]' and the NVIDIA driver)"
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "onnxruntime fell back to the CPU without saying why"


def _flavours() -> str:
    installed = []
    for name, label in FLAVOURS.items():
        try:
            installed.append(f"{label} ({name} {metadata.version(name)})")
        except metadata.PackageNotFoundError:
            continue
    if len(installed) > 1:
        return (f"{' + '.join(installed)}: these overwrite each other; pip uninstall them all, then "
                "pip install 'palionnx[cpu]' or 'palionnx[gpu]'")
    return installed[0] if installed else "installed without a known distribution"


def _describe_gpu(gpu: Gpu) -> str:
    return (f"{gpu.name}, {gpu.memory_free_mb / 1024:.1f} GiB free of {gpu.memory_total_mb / 1024:.1f} GiB, "
            f"driver {gpu.driver}")


def _cpu_rows(flags: set[str] | None) -> list[tuple[str, str]]:
    rows = [("cpu", f"{cpu_name()}, {cpu_count()} cores usable of {os.cpu_count()}")]
    arm = platform.machine().lower() in ("arm64", "aarch64")
    shown = [flag for flag in CPU_FEATURES if (flag in ("asimddp", "i8mm")) == arm]
    if flags is None:
        rows.append(("cpu features", "unknown on this system"))
    else:
        rows.append(("cpu features", ", ".join(f"{CPU_FEATURES[f]} {'yes' if f in flags else 'no'}" for f in shown)))
    return rows


def _storage_rows() -> list[tuple[str, str]]:
    from huggingface_hub import constants

    root = cache_root()
    used = sum(model.size for model in cached_models() if model.origin == "exported")
    hub = constants.HF_HUB_CACHE
    return [("model cache", f"{root} ({human_bytes(used)} used, {human_bytes(free_disk(root))} free; "
                            "$PALIONNX_CACHE moves it)"),
            ("hub cache", f"{hub} ({human_bytes(free_disk(Path(hub)))} free; $HF_HUB_CACHE moves it)")]


def recommend(cuda_works: bool, gpu_free: float | None, ram_available: float | None, flags: set[str] | None) -> str:
    """--device, --quant and --batch-size for this machine, and why (see README, doctor)."""
    if cuda_works and gpu_free is not None:
        if gpu_free >= 16 * GB:
            return ("--device cuda --quant fp16 --batch-size 64 (fp16 is the fastest level on CUDA from batch 8 "
                    "up; images/s grows up to 64 slots)")
        if gpu_free >= 10 * GB:
            return "--device cuda --quant fp16 --batch-size 16 (fp16 fits the GPU; larger batches need more memory)"
        return "--device cuda --quant int4 --batch-size 8 (int4 leaves GPU memory for larger batches)"
    vnni = bool(flags and flags & {"avx512_vnni", "avx_vnni", "asimddp", "i8mm"})
    why = "int8 dot products (VNNI) speed int4 up" if vnni else "int4 is the smallest and fastest here"
    if ram_available is not None and ram_available < INT4_RSS_GB * GB:
        return (f"--device cpu --quant int4 --batch-size 1, but only {ram_available / GB:.1f} GB of RAM is "
                f"available and the 3B model needs about {INT4_RSS_GB} GB at int4")
    ram = float("inf") if ram_available is None else ram_available
    batch = 32 if ram >= INT4_BATCH32_RSS_GB * GB else 8 if ram >= (INT4_RSS_GB + 1) * GB else 1
    return f"--device cpu --quant int4 --batch-size {batch} ({why})"

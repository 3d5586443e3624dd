"""What a first-use export will cost, told before it starts and refused early when the machine lacks it.

The figures scale the export measured on the real `pg1-3b-224` geometry (2.92 B parameters, a 2-core 24 GB
machine; README, Export) by the checkpoint's parameter count.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .tables import human_bytes

GB = 1e9
REFERENCE_PARAMS = 2.92e9  # pg1-3b-224
# quant: (folder GB, export seconds, peak RSS GB) measured for REFERENCE_PARAMS with the fused decoder
# (benchmarks/results/fused-decoder-cpu.md; fp16 and int8 ran beside another job, so their times err high).
MEASURED = {
    "fp32": (11.71, 93, 4.6),
    "fp16": (5.86, 128, 3.6),
    "bf16": (5.86, 118, 3.6),  # measured alone on the AMD VM (/usr/bin/time palionnx export ... --quant bf16)
    "int8": (5.13, 227, 7.0),  # with its int8 QGEMM prefill graph and calibration (README, Export)
    "int4": (3.77, 198, 6.1),  # with its int8 prefill graph and calibration (README, Export)
}
VISION_FP32_GB = 1.66  # int8 / int4 first write the vision encoder in fp32, then quantize it
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ExportEstimate:
    """Resources a first-use export of one checkpoint at one quant level needs."""

    quant: str
    params: float
    download_bytes: int  # the checkpoint files not in the hub cache yet
    folder_bytes: float
    scratch_bytes: float  # the fp32 vision graph written before quantizing, removed at the end
    peak_ram_bytes: float
    seconds: float

    def describe(self) -> str:
        minutes, seconds = divmod(round(self.seconds), 60)
        download = "checkpoint in the hub cache"
        if self.download_bytes:
            download = f"download {human_bytes(self.download_bytes)}"
        count = f"{self.params / 1e9:.2f} B" if self.params >= 1e8 else f"{self.params / 1e6:.1f} M"
        return (f"{download}; export of a {count}-parameter checkpoint: about {minutes} min {seconds:02d} s on "
                f"2 cores, up to {human_bytes(self.peak_ram_bytes)} of RAM, {human_bytes(self.folder_bytes)} on "
                f"disk (plus {human_bytes(self.scratch_bytes)} while it runs)")


def parameter_count(files: dict[str, int | None], config: dict) -> float:
    """Parameters of a checkpoint from its weight files' sizes and the dtype its config.json names."""
    weight_bytes = sum(size or 0 for name, size in files.items() if name.endswith((".safetensors", ".bin")))
    dtype = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return weight_bytes / _DTYPE_BYTES.get(str(dtype), 2)  # unknown: assume 16-bit, which errs on the high side


def estimate(params: float, quant: str, download_bytes: int) -> ExportEstimate:
    folder_gb, seconds, peak_gb = MEASURED[quant]
    scale = params / REFERENCE_PARAMS
    scratch = VISION_FP32_GB * scale * GB if quant in ("int8", "int4") else 0.0
    return ExportEstimate(quant, params, download_bytes, folder_gb * scale * GB, scratch, peak_gb * scale * GB,
                          seconds * scale)


def shortfall(plan: ExportEstimate, available_ram: float | None, free_disk: float) -> str | None:
    """Why this machine cannot run the export (None when it can)."""
    if available_ram is not None and plan.peak_ram_bytes > available_ram:
        return (f"the export needs about {human_bytes(plan.peak_ram_bytes)} of RAM at its peak and "
                f"{human_bytes(available_ram)} is available")
    need = plan.download_bytes + plan.folder_bytes + plan.scratch_bytes
    if need > free_disk:
        return f"the export needs about {human_bytes(need)} of disk and {human_bytes(free_disk)} is free"
    return None


def free_disk(path: Path) -> float:
    """Free bytes on the disk that holds `path` (or would: its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return float(shutil.disk_usage(path).free)


def read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

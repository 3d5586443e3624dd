"""What an export is asked for, checked once: `ExportOptions` (frozen) refuses contradicting or impossible
settings when it is made, and `palionnx export`'s options take their defaults from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.levels import LevelError, resolve_quant, target_device
from .quantize import BITS

KERNEL_CHOICES = ("auto", "nbits", "qgemm")  # int8/int4 on the CPU: measured, MatMulNBits only, int8 QGEMM
LINEAR_LAYOUTS = ("kn", "nk")  # fp32/fp16/bf16 linear weights: [K, N] for MatMul, [N, K] for FusedMatMul transB=1


class ExportError(Exception):
    """The export cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class ExportOptions:
    """The settings of one export (see `palionnx export --help`). Made only when they can work together:
    ExportError naming the option otherwise. `quant` "auto" is resolved when made (fp16 for a CUDA folder,
    int4 for a CPU one) and `target` is the device the folder is built for."""

    quant: str = "auto"  # auto, fp32, fp16, bf16, int8 or int4
    block_size: int | None = None  # int8/int4: None measured on the CPU; for CUDA see runtime/defaults.py
    device: str = "auto"  # what the folder is built for: auto, cpu or cuda
    kernels: str = "auto"  # int8/int4 on the CPU: one of KERNEL_CHOICES
    linear_layout: str = "kn"  # fp32/fp16/bf16: one of LINEAR_LAYOUTS
    calibration: Path | None = None  # int8/int4 on the CPU: a folder of images (None: the packaged ones)
    always_measure: bool = False  # time the CPU kernels even for a small decoder
    target: str = field(init=False)  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        try:
            quant = resolve_quant(self.quant, self.device)
            target = target_device(quant, self.device)
        except LevelError as exc:
            raise ExportError(str(exc)) from None
        object.__setattr__(self, "quant", quant)
        object.__setattr__(self, "target", target)
        if self.calibration is not None:
            object.__setattr__(self, "calibration", Path(self.calibration))
        self._check()

    def _check(self) -> None:
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ExportError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.kernels not in KERNEL_CHOICES:
            raise ExportError(f"--cpu-kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.kernels == "qgemm" and not self.calibrated:
            raise ExportError("--cpu-kernels qgemm is for int8/int4 folders built for the CPU (QGEMM has no CUDA "
                              "kernel)")
        if self.linear_layout not in LINEAR_LAYOUTS:
            raise ExportError(f"linear_layout must be one of {', '.join(LINEAR_LAYOUTS)}, got {self.linear_layout!r}")
        if self.transposed and self.quantized:
            raise ExportError("linear_layout nk is for fp32/fp16/bf16 (int8/int4 weights have their kernel's layout)")
        if self.calibration is not None and not self.calibrated:
            raise ExportError("--calibration is for int8/int4 folders built for the CPU (the only ones with int8 "
                              "activations)")
        if self.calibration is not None and not self.calibration.is_dir():
            raise ExportError(f"--calibration {self.calibration} is not a folder of images")

    @property
    def quantized(self) -> bool:
        """int8/int4: weights on a quantized kernel."""
        return self.quant in BITS

    @property
    def calibrated(self) -> bool:
        """int8/int4 for the CPU: int8 activations, checked on calibration images, kernels chosen here."""
        return self.quantized and self.target == "cpu"

    @property
    def transposed(self) -> bool:
        """fp32/fp16/bf16 linear weights stored [N, K] (FusedMatMul transB=1)."""
        return self.linear_layout == "nk"

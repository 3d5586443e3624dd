"""Export options are checked when made, before any checkpoint is read: each impossible combination is one
ExportError sentence naming the option, and "auto" resolves to the level and device the folder gets."""

from dataclasses import FrozenInstanceError

import pytest

from palionnx.export.options import ExportError, ExportOptions
from palionnx.runtime.providers import cuda_available


@pytest.mark.parametrize(("settings", "message"), [
    (dict(quant="int3"), "unknown quant level 'int3'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(quant="fp32", device="cuda"), "fp32 is the CPU level"),
    (dict(quant="bf16", device="cpu"), "bf16 runs on CUDA only"),
    (dict(quant="int4", block_size=48), "--block-size must be a power of two >= 16, got 48"),
    (dict(quant="int4", block_size=8), "--block-size must be a power of two >= 16, got 8"),
    (dict(quant="int4", device="cpu", kernels="fastest"), "--cpu-kernels must be one of auto, nbits, qgemm"),
    (dict(quant="int8", device="cuda", kernels="qgemm"), "QGEMM has no CUDA kernel"),
    (dict(quant="fp32", kernels="qgemm"), "--cpu-kernels qgemm is for int8/int4 folders built for the CPU"),
    (dict(quant="fp32", linear_layout="kx"), "linear_layout must be one of kn, nk, got 'kx'"),
    (dict(quant="int4", device="cpu", linear_layout="nk"), "linear_layout nk is for fp32/fp16/bf16"),
    (dict(quant="fp32", calibration="."), "--calibration is for int8/int4 folders built for the CPU"),
    (dict(quant="int4", device="cuda", calibration="."), "--calibration is for int8/int4 folders built for the CPU"),
    (dict(quant="int4", device="cpu", calibration="/no/such/folder"), "is not a folder of images"),
])
def test_impossible_options_are_one_sentence(settings, message):
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        ExportOptions(**settings)


def test_auto_resolves_to_the_level_and_device_of_the_folder(tmp_path):
    cuda = cuda_available()
    auto = ExportOptions()
    assert (auto.quant, auto.target) == (("fp16", "cuda") if cuda else ("int4", "cpu"))
    assert ExportOptions(device="cpu").quant == "int4" and ExportOptions(device="cuda").quant == "fp16"
    assert ExportOptions(quant="fp16").target == "cuda" and ExportOptions(quant="fp32").target == "cpu"
    cpu_int8 = ExportOptions(quant="int8", device="cpu", calibration=str(tmp_path), block_size=64)
    assert cpu_int8.quantized and cpu_int8.calibrated and cpu_int8.calibration == tmp_path
    assert not ExportOptions(quant="int8", device="cuda").calibrated and not ExportOptions(quant="bf16").quantized
    assert ExportOptions(quant="fp32", linear_layout="nk").transposed


def test_options_are_frozen():
    with pytest.raises(FrozenInstanceError):
        ExportOptions(quant="fp32").quant = "int4"  # type: ignore[misc]

"""Shared fixtures: tiny random-weight PaliGemma checkpoints and their exports, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

FAMILIES = ("tiny-pg1", "tiny-pg2")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """tiny-pg1 (Gemma, MQA) and tiny-pg2 (Gemma 2, GQA, sliding window 6) checkpoints on disk."""
    from palionnx.export.synth import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(name, root / name, seed=0) for name in FAMILIES}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoints):
    """exported(family, quant, device, kernels) -> model folder, exported on first use and reused.

    device "auto" is what the level implies (fp32: cpu, fp16: cuda) and cpu for int8/int4 on these
    machines; pass "cuda" for int8/int4 folders built for CUDA (float16 compute), which run on the CPU too.
    kernels: the CPU kernels of int8/int4 ("auto": the tiny decoders are too small to measure, so MatMulNBits
    at block 32; "qgemm": int8 QGEMM for the vision encoder and prefill)."""
    from palionnx.export.convert import export

    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str, str, str], Path] = {}

    def get(family: str, quant: str = "fp32", device: str = "auto", kernels: str = "auto") -> Path:
        key = (family, quant, device, kernels)
        if key not in cache:
            folder = root / "-".join(key)
            export(checkpoints[family], folder, quant=quant, device=device, kernels=kernels)
            cache[key] = folder
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference(checkpoints):
    """reference(family) -> (model, processor) from transformers, loaded once."""
    from palionnx.export.validate import load_reference

    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_reference(checkpoints[family])
        return cache[family]

    return get


@pytest.fixture
def model(exported) -> Path:
    """The tiny PaliGemma 1 fp32 folder the CLI tests caption with."""
    return exported("tiny-pg1", "fp32")

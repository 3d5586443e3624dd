"""Shared fixtures: tiny random-weight PaliGemma checkpoints and their exports, built once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A test run started in the background by a non-interactive shell inherits SIGINT ignored, and so would every
# palionnx it starts: give them a terminal's Ctrl-C, which the interrupt tests check.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAMILIES = ("tiny-pg1", "tiny-pg2", "tiny-pg2-28b")  # the last: the 28B's attention scale, a 4 x 4 image grid


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """tiny-pg1 (Gemma, MQA), tiny-pg2 (Gemma 2, GQA, sliding window 6) and tiny-pg2-28b (Gemma 2 27B's
    query_pre_attn_scalar, a prompt beyond its window as at 896 px) checkpoints on disk."""
    from palionnx.testmodels.synth import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(name, root / name, seed=0) for name in FAMILIES}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoints):
    """exported(family, quant, device, kernels, linear_layout) -> model folder, exported on first use and reused.

    device "auto" is what the level implies (fp32: cpu, fp16: cuda) and cpu for int8/int4 on these
    machines; pass "cuda" for int8/int4 folders built for CUDA (float16 compute), which run on the CPU too.
    kernels: the CPU kernels of int8/int4 ("auto": the tiny decoders are too small to measure, so MatMulNBits
    at block 32; "qgemm": int8 QGEMM for the vision encoder and prefill). linear_layout: "kn" or "nk" (fp32/fp16/bf16
    linear weights for MatMul or FusedMatMul transB=1)."""
    from palionnx.export.convert import export

    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, ...], Path] = {}

    def get(family: str, quant: str = "fp32", device: str = "auto", kernels: str = "auto",
            linear_layout: str = "kn") -> Path:
        key = (family, quant, device, kernels, linear_layout)
        if key not in cache:
            folder = root / "-".join(key)
            export(checkpoints[family], folder, quant=quant, device=device, kernels=kernels,
                   linear_layout=linear_layout)
            cache[key] = folder
        return cache[key]

    return get


@pytest.fixture(scope="session")
def numpy_folder(tmp_path_factory):
    """numpy_folder(family, level) -> a CPU folder of tiny-pg1 / tiny-pg2 at fp32, int8 or int4 (MatMulNBits)
    written from numpy weights without torch (palionnx.export.numpy_folder), built on first use: the unit tier's
    model."""
    from palionnx.export.numpy_folder import write_folder

    root = tmp_path_factory.mktemp("numpy-folders")
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, level: str = "fp32") -> Path:
        if (family, level) not in cache:
            cache[family, level] = write_folder(family, root / f"{family}-{level}", level=level)
        return cache[family, level]

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


_TRAINING: dict[str, subprocess.Popen] = {}  # trained checkpoint name -> the child training it


# The integration tier: tests that build checkpoints or exports through torch, compare with transformers, train,
# or start processes. Everything else is the unit tier (`scripts/test.sh --fast`: `pytest -m "not integration"`).
TORCH_FIXTURES = {"checkpoints", "exported", "reference", "model", "shapes_pg1", "shapes_exported"}
PROCESS_CALLS = ("palionnx(", "Server(", "subprocess.", "Popen(", "import torch", "transformers", "write_checkpoint",
                 "export(", "trained_checkpoint(", "train(")


def _integration(item) -> bool:
    """Whether a collected test belongs to the integration tier (see TORCH_FIXTURES and PROCESS_CALLS: read from
    the source of the test function and of every fixture it uses, so a helper counts only through its name)."""
    import inspect

    if TORCH_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    functions = [item.function] + [definition.func for definitions in item._fixtureinfo.name2fixturedefs.values()
                                   for definition in definitions if definition.baseid]  # the suite's own fixtures
    for function in functions:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            return True
        if any(call in source for call in PROCESS_CALLS):
            return True
    return False


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "integration: torch, transformers, training or subprocesses (see conftest)")


def pytest_collection_modifyitems(session, config, items) -> None:
    """Mark the integration tier (before `-m` deselects by the mark)."""
    for item in items:
        if _integration(item):
            item.add_marker(pytest.mark.integration)


def pytest_collection_finish(session) -> None:
    """When a test that will run needs the trained shapes-pg1 and it is not cached, start training it in a
    child process now: it trains (minutes, once per machine) while the other tests run. Only the selected
    tests count: the unit tier (`-m "not integration"`) never starts it."""
    if not any("shapes_pg1" in item.fixturenames for item in session.items):
        return
    from palionnx.cli.models import cache_root
    from palionnx.testmodels.trained import cache_key

    if not (cache_root() / "trained" / f"shapes-pg1-{cache_key('shapes-pg1')}" / "config.json").is_file():
        code = ("from palionnx.cli.models import cache_root; "
                "from palionnx.testmodels.trained import trained_checkpoint; "
                "trained_checkpoint('shapes-pg1', cache_root() / 'trained')")
        # at the lowest priority, so that it only takes the CPU the tests leave (timing-sensitive tests such as
        # the interrupted run see an idle machine); it gets all of it while shapes_pg1 waits for it
        _TRAINING["shapes-pg1"] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                                   preexec_fn=lambda: os.nice(19))


def pytest_sessionfinish(session, exitstatus) -> None:
    for child in _TRAINING.values():
        child.kill()


@pytest.fixture(scope="session")
def shapes_pg1() -> Path:
    """The trained shapes-pg1 checkpoint, from the palionnx cache (trained there on first use: minutes)."""
    from palionnx.cli.models import cache_root
    from palionnx.testmodels.trained import trained_checkpoint

    child = _TRAINING.pop("shapes-pg1", None)
    if child is not None:
        child.wait()  # had it failed, the same error comes again from training here
    return trained_checkpoint("shapes-pg1", cache_root() / "trained")


@pytest.fixture(scope="session")
def shapes_exported(tmp_path_factory, shapes_pg1):
    """shapes_exported(quant, block_size) -> the trained shapes-pg1 exported for the CPU, on first use.

    int8/int4 use MatMulNBits at the given block size (no measured choice: the quality tests compare levels)."""
    from palionnx.export.convert import export

    root = tmp_path_factory.mktemp("shapes")
    cache: dict[tuple[str, int], Path] = {}

    def get(quant: str = "fp32", block_size: int = 32) -> Path:
        if (quant, block_size) not in cache:
            folder = root / f"shapes-pg1-{quant}-b{block_size}"
            quantized = quant in ("int8", "int4")
            export(shapes_pg1, folder, quant=quant, device="cpu", block_size=block_size if quantized else None,
                   kernels="nbits" if quantized else "auto")
            cache[quant, block_size] = folder
        return cache[quant, block_size]

    return get

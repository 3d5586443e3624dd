"""Export a PaliGemma / PaliGemma 2 checkpoint to a self-describing ONNX model folder.

    export(source, outdir, quant="int4")

writes `vision_encoder.onnx`, `embed_tokens.onnx`, `decoder_model_merged.onnx` (each with its
`.onnx.data`), `tokenizer.json` and, last, `palionnx.json`. A folder without the manifest is incomplete.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import queue
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..runtime.contract import (
    DECODER,
    EMBED_TOKENS,
    GRAPH_FILES,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    VISION_ENCODER,
    graph_io,
)
from ..runtime.defaults import DEFAULT_BLOCK_SIZE
from ..runtime.integrity import record_files
from ..runtime.manifest import QUANT_LEVELS, GraphInfo, Manifest, QuantInfo
from ..system import rss_bytes
from . import quantize
from .checkpoint import Checkpoint, open_checkpoint
from .output import staged_output

OPSET = 21

Progress = Callable[[str], None]


class ExportError(Exception):
    """The export cannot go on; the message says why and what to do."""


def export(
    source: str | Path,
    outdir: str | Path,
    quant: str = "fp32",
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Progress | None = None,
) -> Manifest:
    """Export `source` (a local checkpoint folder or a hub id) to `outdir` at `quant` precision."""
    if quant not in QUANT_LEVELS:
        raise ExportError(f"unknown quant level {quant!r}: use one of {', '.join(QUANT_LEVELS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"--block-size must be a power of two >= 16, got {block_size}")
    started = time.monotonic()
    say = _timed(progress, started)
    with staged_output(Path(outdir)) as staging:  # renamed to `outdir` once complete; removed on failure
        manifest = _write_folder(source, staging, quant, block_size, progress, started)
    say(f"done: {outdir}")
    return manifest


def _write_folder(
    source: str | Path, outdir: Path, quant: str, block_size: int, progress: Progress | None, started: float
) -> Manifest:
    """Write the whole model folder into `outdir`, the manifest (with every file's size and hash) last."""
    say = _timed(progress, started)
    say(f"reading checkpoint {source}")
    checkpoint = open_checkpoint(source, load_model=False)
    checkpoint.tokenizer.backend_tokenizer.save(str(outdir / TOKENIZER_NAME))

    staging = outdir / ".staging" if quant in quantize.BITS else outdir
    staging.mkdir(exist_ok=True)
    try:
        graphs = _export_in_child(checkpoint.folder, staging, quant == "fp16", progress, started)
        if quant in quantize.BITS:
            for role, info in graphs.items():
                say(f"quantizing {role} to {quant} (MatMulNBits, block {block_size})")
                quantize.quantize_graph(staging / info.file, outdir / info.file, quant, block_size,
                                        gather=role == EMBED_TOKENS)
    finally:
        if staging != outdir:
            shutil.rmtree(staging, ignore_errors=True)

    manifest = _manifest(checkpoint, graphs, quant, block_size)
    say("recording file sizes and SHA-256")
    manifest.files = record_files(outdir, skip=(MANIFEST_NAME,))
    manifest.save(outdir)
    return manifest


def _export_in_child(
    folder: Path, staging: Path, fp16: bool, progress: Progress | None, started: float
) -> dict[str, GraphInfo]:
    """Run the torch export in a child process and wait for its graphs.

    The transformers model and the exporter's copies of the weights (together ~20 GB for a 3B model)
    all go back to the OS when the child exits, so quantization starts from a small process.
    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    child = context.Process(target=_export_worker, args=(str(folder), str(staging), fp16, messages, started))
    child.start()
    while True:
        try:
            kind, payload = messages.get(timeout=1.0)
        except queue.Empty:
            if child.is_alive():
                continue
            raise ExportError(f"the export process died (exit code {child.exitcode}): out of memory?") from None
        if kind == "progress":
            if progress:
                progress(payload)
            continue
        child.join()
        if kind == "error":
            raise ExportError(payload)
        return payload


def _export_worker(folder: str, staging: str, fp16: bool, messages: Any, started: float) -> None:
    """Child process: load the model and export its three graphs, reporting through `messages`."""
    try:
        _quiet_exporters()
        say = _timed(lambda text: messages.put(("progress", text)), started)
        say("loading the model for export")
        # fp16 loads the weights as fp16 directly: converting a loaded fp32 model would hold both copies.
        checkpoint = open_checkpoint(folder, dtype="float16" if fp16 else "float32")
        messages.put(("done", _export_graphs(checkpoint, Path(staging), fp16, say)))
    except Exception as exc:  # everything goes back to the parent as a message
        messages.put(("error", f"exporting failed: {type(exc).__name__}: {exc}"))


def _export_graphs(checkpoint: Checkpoint, folder: Path, fp16: bool, say: Progress) -> dict[str, GraphInfo]:
    import torch

    from .graphs import Decoder, TokenEmbedder, VisionEncoder

    model = checkpoint.model
    cfg = model.config.text_config
    vcfg = model.config.vision_config
    batch, seq, max_len = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("max_len")
    kv_dtype = torch.float16 if fp16 else torch.float32
    layers = cfg.num_hidden_layers
    # Example sizes of at least 2 everywhere: torch.export specialises dimensions of size 0 or 1.
    jobs = {
        VISION_ENCODER: (
            VisionEncoder(model), (torch.zeros(2, 3, vcfg.image_size, vcfg.image_size),), ({0: batch},),
        ),
        EMBED_TOKENS: (TokenEmbedder(model), (torch.zeros(2, 3, dtype=torch.int64),), ({0: batch, 1: seq},)),
        DECODER: (
            Decoder(model),
            (
                torch.zeros(2, 3, cfg.hidden_size), torch.ones(2, 5, dtype=torch.int64),
                torch.ones(2, 3, dtype=torch.int64), torch.tensor(2, dtype=torch.int64),
                *(torch.zeros(2, cfg.num_key_value_heads, 5, cfg.head_dim, dtype=kv_dtype) for _ in range(2 * layers)),
            ),
            (
                {0: batch, 1: seq}, {0: batch, 1: max_len}, {0: batch, 1: seq}, None,
                tuple({0: batch, 2: max_len} for _ in range(2 * layers)),
            ),
        ),
    }
    graphs = {}
    for role, (module, args, dynamic) in jobs.items():
        say(f"exporting {role} ({'fp16' if fp16 else 'fp32'})")
        io = graph_io(role, layers)
        path = folder / GRAPH_FILES[role]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, input_names=io.inputs, output_names=io.outputs,
                dynamic_shapes=dynamic, opset_version=OPSET, external_data=True, verbose=False,
            )
        assert program is not None
        program.save(str(path), external_data=True)
        del program
        gc.collect()
        graphs[role] = GraphInfo(file=path.name, inputs=io.inputs, outputs=io.outputs)
    return graphs


def _manifest(checkpoint: Checkpoint, graphs: dict[str, GraphInfo], quant: str, block_size: int) -> Manifest:
    cfg = checkpoint.config
    text = cfg.text_config
    is_pg2 = text.model_type == "gemma2"
    quant_info = QuantInfo(level=quant)
    if quant in quantize.BITS:
        quant_info = QuantInfo(level=quant, bits=quantize.BITS[quant], block_size=block_size, symmetric=True,
                               accuracy_level=quantize.ACCURACY_LEVEL, method="MatMulNBits + GatherBlockQuantized")
    elif quant == "fp16":
        quant_info = QuantInfo(level=quant, fp32_kept=["residual stream", "RMSNorm",
                                                       "attention softmax and soft-capping",
                                                       "MLP gate*up product (clamped)", "logits"])
    return Manifest(
        family="pg2" if is_pg2 else "pg1",
        image_size=checkpoint.image_size,
        image_mean=checkpoint.image_mean,
        image_std=checkpoint.image_std,
        resample=checkpoint.resample,
        rescale_factor=checkpoint.rescale_factor,
        image_seq_length=checkpoint.image_seq_length,
        image_token_id=cfg.image_token_id,
        bos_token_id=checkpoint.bos_token_id,
        eos_token_ids=checkpoint.eos_token_ids,
        pad_token_id=checkpoint.pad_token_id,
        prompt_template="{image}{bos}{prompt}\n",
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        hidden=text.hidden_size,
        vocab_size=text.vocab_size,
        max_positions=text.max_position_embeddings,
        sliding_window=text.sliding_window if is_pg2 else None,
        quant=quant_info,
        kv_dtype="float16" if quant == "fp16" else "float32",
        graphs=graphs,
        opset=OPSET,
        source={"id": checkpoint.source_id, "revision": checkpoint.revision},
        palionnx_version=__version__,
    )


def _quiet_exporters() -> None:
    """torch.onnx and onnx-ir log every pass; keep their warnings and errors only."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._export", "torch.export",
             "onnx_ir", "onnxscript", "onnxruntime")
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)


def _timed(progress: Progress | None, started: float) -> Progress:
    """Prefix each progress message with the seconds since `started` (time.monotonic(), the same clock in
    the child process) and this process's memory."""

    def say(message: str) -> None:
        if progress:
            progress(f"[{time.monotonic() - started:6.1f}s, RSS {_rss_gb():4.1f} GB] {message}")

    return say


def _rss_gb() -> float:
    """Resident memory of this process now (its peak where the OS gives only that)."""
    return (rss_bytes() or rss_bytes(peak=True) or 0) / 2**30

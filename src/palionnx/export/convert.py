"""Export a PaliGemma / PaliGemma 2 checkpoint to a self-describing ONNX model folder.

    export(source, outdir, quant="int4", device="cpu")

writes `vision_encoder.onnx` (torch export of SigLIP + projector), `decoder.onnx` (the fused decoder written
node by node, export/decoder.py; Gemma 2 adds `decoder_windowed.onnx` over the same weights), their `.data`
files, `tokenizer.json` and, last, `palionnx.json`. A folder without the manifest is incomplete. For int8/int4
on the CPU, the kernels (block size, MatMulNBits or int8 QGEMM, a separate prefill graph) are chosen by
timing the candidates on this machine (export/tune.py) unless the caller fixes them.
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

from ..runtime.contract import GRAPH_FILES, MANIFEST_NAME, TOKENIZER_NAME, VISION_ENCODER, graph_io
from ..runtime.defaults import CUDA_INT4_BLOCK_SIZE, DEFAULT_BLOCK_SIZE, DEFAULT_PROMPT
from ..runtime.integrity import record_files
from ..runtime.manifest import CpuKernels, GraphInfo, Manifest, QuantInfo
from ..runtime.preprocess import ImageSpec
from ..system import rss_bytes
from ..version import __version__
from . import calibrate, graph_quantize, quantize, tune
from .checkpoint import Checkpoint, open_checkpoint
from .decoder import GQA_CUDA_MAX_HEAD, GQA_HEAD_MULTIPLE, DecoderConfig, Precision, build_decoder
from .linear import SitePlan
from .options import ExportError, ExportOptions
from .output import staged_output
from .quantize import Kernel
from .weights import CheckpointWeights, tensor_files

Progress = Callable[[str], None]


def export(source: str | Path, outdir: str | Path, options: ExportOptions | None = None,
           progress: Progress | None = None, **settings: Any) -> Manifest:
    """Export `source` (a local checkpoint folder or a hub id) to `outdir` as `options` say, or the
    `ExportOptions` fields given as keywords (`export(src, out, quant="int4", device="cpu")`).

    int8/int4 for the CPU run the float model on the calibration images (default: the packaged samples and
    procedural scenes) to keep each layer's int8 activations within linear.ERROR_BOUND, and time the kernels
    (for decoders of tune.MIN_MEASURED_PARAMS or more, or with `always_measure`) unless the options fix them;
    int8/int4 for CUDA take MatMulNBits at the CUDA block size (int4 128 where the hidden size allows, else 32);
    fp32/fp16/bf16 store linear weights as `linear_layout` says. ExportError when it cannot go on."""
    if options is None:
        options = ExportOptions(**settings)
    elif settings:
        raise TypeError("export() takes options or their fields as keywords, not both")
    started = time.monotonic()
    say = _timed(progress, started)
    with staged_output(Path(outdir)) as staging:  # renamed to `outdir` once complete; removed on failure
        manifest = _write_folder(source, staging, options, progress, started)
    say(f"done: {outdir}")
    return manifest


def _check_attention(head_dim: int, target: str) -> None:
    """ExportError when onnxruntime's GroupQueryAttention, which the decoder runs on, cannot run this head size."""
    if head_dim % GQA_HEAD_MULTIPLE:
        raise ExportError(f"text_config.head_dim is {head_dim}: onnxruntime's GroupQueryAttention, which the decoder "
                          f"runs on, needs a multiple of {GQA_HEAD_MULTIPLE}, so this checkpoint cannot run")
    if target == "cuda" and head_dim > GQA_CUDA_MAX_HEAD:
        raise ExportError(f"text_config.head_dim is {head_dim}: onnxruntime's CUDA GroupQueryAttention takes at most "
                          f"{GQA_CUDA_MAX_HEAD}; export for the CPU (--device cpu) instead")


def _write_folder(source: str | Path, outdir: Path, o: ExportOptions, progress: Progress | None,
                  started: float) -> Manifest:
    """Write the whole model folder into `outdir`, the manifest (with every file's size and hash) last."""
    say = _timed(progress, started)
    say(f"reading checkpoint {source}")
    checkpoint = open_checkpoint(source, load_model=False)
    config = DecoderConfig.from_text_config(checkpoint.config.text_config)
    _check_attention(config.head_dim, o.target)
    if o.quantized and o.block_size and config.hidden % o.block_size:
        raise ExportError(f"--block-size {o.block_size} does not divide the hidden size {config.hidden}")
    checkpoint.tokenizer.backend_tokenizer.save(str(outdir / TOKENIZER_NAME))
    scratch = outdir / ".vision"  # the vision encoder as torch exports it, before quantizing
    scratch.mkdir(exist_ok=True)
    try:
        # bf16 folders keep the fp16 vision encoder: onnxruntime's CUDA Conv has bfloat16 from opset 22 only
        vision = _export_in_child(checkpoint.folder, scratch, o.quant in ("fp16", "bf16"), progress, started)
        # read after the vision export, which reports an unreadable checkpoint as one line
        weights = CheckpointWeights(checkpoint.folder, checkpoint.config.text_config,
                                    "float16" if o.quant == "fp16" else "float32")
        if o.quantized:
            calibration = _calibrate(checkpoint, config, scratch / vision.file, weights, o.calibration, say) \
                if o.calibrated else None
            plan = _kernel_plan(checkpoint, config, o, calibration, say)
            precision = _quantized_precision(o, config, plan, calibration)
            quant_info = QuantInfo(level=o.quant, bits=quantize.BITS[o.quant], block_size=precision.block_size,
                                   symmetric=True, accuracy_level=precision.accuracy_level, method=_method(plan),
                                   cpu_kernels=plan if o.calibrated else None)
            kernel = Kernel.parse(plan.vision)
            say(f"quantizing the vision encoder to {o.quant} ({kernel.name})")
            graph_quantize.quantize_graph(scratch / vision.file, outdir / vision.file, kernel,
                                          precision.accuracy_level,
                                          calibration.check("vision", kernel) if calibration else None)
        else:
            precision = Precision.for_level(o.quant, o.target, config.gemma2, DEFAULT_BLOCK_SIZE,
                                            transposed=o.transposed)
            quant_info = _float_info(o.quant, config.gemma2)
            for path in scratch.iterdir():
                shutil.move(str(path), outdir / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    notes = f", prefill graph on {precision.prefill_kernel.name}" if precision.prefill_kernel else ""
    notes += ", linear weights [N, K]" if precision.transposed else ""
    say(f"writing the decoder ({o.quant}, {precision.compute_dtype} compute, for {o.target}{notes})")
    graphs = {VISION_ENCODER: vision, **build_decoder(outdir, config, precision, weights)}
    manifest = _manifest(checkpoint, graphs, quant_info, precision.compute_dtype, o.target)
    say("recording file sizes and SHA-256")
    manifest.files = record_files(outdir, skip=(MANIFEST_NAME,))
    manifest.save(outdir)
    return manifest


def _calibrate(checkpoint: Checkpoint, config: DecoderConfig, vision_graph: Path, weights: CheckpointWeights,
               folder: Path | None, say: Progress) -> calibrate.Calibration:
    """Run the float model on the calibration images (a folder's, or the packaged samples and scenes)."""
    spec = ImageSpec(checkpoint.image_size, checkpoint.image_mean, checkpoint.image_std, checkpoint.rescale_factor,
                     checkpoint.resample)
    try:
        images = calibrate.calibration_images(folder, checkpoint.image_size)
    except calibrate.CalibrationError as exc:
        raise ExportError(str(exc)) from None
    described = f"{folder} ({len(images)} images)" if folder else \
        f"{calibrate.SAMPLE_IMAGES} sample images and {calibrate.SCENES} scenes"
    tokens = checkpoint.tokenizer
    text = [checkpoint.bos_token_id] + tokens.encode(DEFAULT_PROMPT + "\n", add_special_tokens=False)
    return calibrate.calibrate(images, described, spec, vision_graph, weights, config, text, say)


def _kernel_plan(checkpoint: Checkpoint, config: DecoderConfig, o: ExportOptions,
                 calibration: calibrate.Calibration | None, say: Progress) -> CpuKernels:
    """The kernels of an int8/int4 folder. For CUDA: MatMulNBits at the CUDA block size everywhere. For the
    CPU: timed here on the candidates the options leave, each checked on the calibration activations."""
    if calibration is None:
        kernel = quantize.nbits(o.quant, o.block_size or cuda_block_size(o.quant, config.hidden))
        return tune.default_plan(kernel)
    vision_config = checkpoint.config.vision_config
    decoder = tune.decoder_probe(config.hidden, config.intermediate, config.heads, config.kv_heads, config.head_dim,
                                 checkpoint.image_seq_length + tune.PROMPT_TEXT_TOKENS)
    vision = tune.vision_probe(vision_config.hidden_size, vision_config.intermediate_size,
                               checkpoint.image_seq_length)

    def measure(kernels: list[Kernel]) -> dict[str, dict[str, float]]:
        say(f"timing {len(kernels)} kernels on one decoder layer and one vision layer "
            f"({', '.join(k.name for k in kernels)})")
        return tune.measure(kernels, decoder, vision, say=say)

    def check(graph: str, kernel: Kernel) -> dict[str, SitePlan]:
        plans = calibration.check(graph, kernel)
        split = sum(1 for p in plans.values() if p.outliers)
        floats = sum(1 for p in plans.values() if p.float_compute)
        say(f"  {kernel.name} on the {graph}'s {len(plans)} inputs: {split} with outlier channels split off, "
            f"{floats} in float (largest error as they are: {max(p.plain_error for p in plans.values()):.3f})")
        return plans

    params = decoder.params * config.layers
    split_bytes = int(tune.prefill_graph_bytes(o.quant, params, config.vocab * config.hidden))
    plan = tune.choose(o.quant, config.hidden, params, o.kernels, o.block_size, measure, split_bytes, check,
                       o.always_measure)
    plan.calibration, plan.activations = calibration.images, calibration.summary()
    batched = f", decode batches of {plan.batch_decode_from}+ on {plan.prefill}" if plan.batch_decode_from else ""
    say(f"kernels ({plan.chosen_by}): vision {plan.vision}, prefill {plan.prefill}, decode {plan.decode}{batched}")
    return plan


def _quantized_precision(o: ExportOptions, config: DecoderConfig, plan: CpuKernels,
                         calibration: calibrate.Calibration | None) -> Precision:
    """An int8/int4 folder's precision: the plan's kernels, each site fed as the calibration says."""
    decode, prefill = Kernel.parse(plan.decode), Kernel.parse(plan.prefill)
    sites = {k.name: calibration.check("decoder", k) for k in {decode, prefill}} if calibration else {}
    return Precision.for_level(o.quant, o.target, config.gemma2, tune.table_block_size(plan, o.block_size), decode,
                               prefill, sites=sites)


def cuda_block_size(quant: str, hidden: int) -> int:
    """The default block of a CUDA folder's int8/int4 weights (see runtime/defaults.py)."""
    return CUDA_INT4_BLOCK_SIZE if quant == "int4" and hidden % CUDA_INT4_BLOCK_SIZE == 0 else DEFAULT_BLOCK_SIZE


def _export_in_child(folder: Path, scratch: Path, fp16: bool, progress: Progress | None,
                     started: float) -> GraphInfo:
    """Run the torch export of the vision encoder in a child process and wait for it.

    The transformers model and the exporter's copies of the weights go back to the OS when the child
    exits, so the decoder build and quantization start from a small process.
    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    child = context.Process(target=_export_worker, args=(str(folder), str(scratch), fp16, messages, started))
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


def _export_worker(folder: str, scratch: str, fp16: bool, messages: Any, started: float) -> None:
    """Child process: read the vision encoder's weights and export it, reporting through `messages`."""
    try:
        _quiet_exporters()
        from transformers import AutoConfig

        from .vision import load_vision_encoder

        say = _timed(lambda text: messages.put(("progress", text)), started)
        say("reading the vision encoder's weights")
        # only the vision tower and projector are read: the language model never enters memory
        config = AutoConfig.from_pretrained(folder)
        encoder = load_vision_encoder(config, tensor_files(Path(folder)))
        if fp16:
            encoder.half()
        say(f"exporting the vision encoder ({'fp16' if fp16 else 'fp32'})")
        messages.put(("done", _export_vision(encoder, config.vision_config.image_size, Path(scratch))))
    except Exception as exc:  # everything goes back to the parent as a message
        messages.put(("error", f"exporting failed: {type(exc).__name__}: {exc}"))


def _export_vision(encoder: Any, size: int, folder: Path) -> GraphInfo:
    import torch

    io = graph_io(VISION_ENCODER, 0)
    path = folder / GRAPH_FILES[VISION_ENCODER]
    # An example batch of 2: torch.export specialises dimensions of size 0 or 1.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            encoder, (torch.zeros(2, 3, size, size),), dynamo=True, input_names=io.inputs,
            output_names=io.outputs, dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=quantize.OPSET, external_data=True, verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=True)
    del program
    gc.collect()
    return GraphInfo(file=path.name, inputs=io.inputs, outputs=io.outputs)


def _float_info(level: str, gemma2: bool) -> QuantInfo:
    """What an fp32/fp16/bf16 folder keeps in float32."""
    if level == "fp32":
        return QuantInfo(level=level)
    kept = ["residual stream and RMSNorm (Gemma 2)"] if gemma2 and level == "fp16" else []
    return QuantInfo(level=level, fp32_kept=kept + ["attention softmax (inside the kernel)", "logits"])


def _manifest(checkpoint: Checkpoint, graphs: dict[str, GraphInfo], quant_info: QuantInfo, kv_dtype: str,
              device: str) -> Manifest:
    """The folder's manifest (its files are recorded last, by the caller)."""
    cfg = checkpoint.config
    text = cfg.text_config
    is_pg2 = text.model_type == "gemma2"
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
        device=device,
        kv_dtype=kv_dtype,
        graphs=graphs,
        opset=quantize.OPSET,
        source={"id": checkpoint.source_id, "revision": checkpoint.revision},
        palionnx_version=__version__,
    )


def _method(plan: CpuKernels) -> str:
    """The operators, in words: MatMulNBits everywhere, or which parts run on int8 QGEMM."""
    method = "MatMulNBits + GatherBlockQuantized"
    parts = [name for name, kernel in (("vision", plan.vision), ("prefill", plan.prefill), ("decode", plan.decode))
             if kernel == quantize.QGEMM.name]
    return method + (f"; MatMulIntegerToFloat (int8 activations per row) for {', '.join(parts)}" if parts else "")


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

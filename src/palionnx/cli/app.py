"""The `palionnx` command: a thin typer layer over palionnx.export and palionnx.runtime."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..runtime.captioner import Captioner
from ..runtime.contract import MANIFEST_NAME, folder_size
from ..runtime.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from .files import ImageJob
from .models import DEFAULT_MODEL

app = typer.Typer(
    help="Caption images with PaliGemma through ONNX Runtime. Export a checkpoint once, run it anywhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]},
)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _need_export_extra() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        _err("error: exporting needs the export extra: pip install 'palionnx[export]' (see README, Install)")
        raise typer.Exit(2) from None


# Options of `caption`, declared once here so the command's signature stays readable.
Inputs = Annotated[list[str], typer.Argument(
    metavar="INPUT...", help="Image files, folders (searched recursively) or quoted globs.", show_default=False)]
ModelOpt = Annotated[str, typer.Option(help="Exported model folder, or a hub id exported on first use into the "
                                            "cache (~/.cache/palionnx, or $PALIONNX_CACHE).")]
QuantOpt = Annotated[str, typer.Option(help="Precision when --model is a hub id exported on first use: auto "
                                            "(fp16 on CUDA, int4 on the CPU), fp32, fp16, int8 or int4.")]
ExtOpt = Annotated[str, typer.Option(help="Caption file extension: .txt or .caption.")]
OutputDirOpt = Annotated[Path | None, typer.Option(help="Write captions here, mirroring the input folders, "
                                                        "instead of beside the images.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite/--skip-existing",
                                            help="Replace existing captions, or skip their images.")]
JsonlOpt = Annotated[Path | None, typer.Option(help="Append one JSON record per image to this file "
                                                    "(path, caption, tokens, timings, error).")]
PrefixOpt = Annotated[str, typer.Option(help='Text put before every caption, e.g. "sks, ".')]
SuffixOpt = Annotated[str, typer.Option(help="Text put after every caption.")]
PromptOpt = Annotated[str, typer.Option(help="Prompt given to the model.")]
MaxTokensOpt = Annotated[int, typer.Option(min=1, help="Longest caption, in tokens.")]
BatchOpt = Annotated[int | None, typer.Option(min=1, help="Images captioned together (default 64 on CUDA, 4 on "
                                                           "the CPU).", show_default=False)]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if it works, else CPU), cuda or cpu.")]
RecursiveOpt = Annotated[bool, typer.Option("--recursive/--no-recursive", help="Search folders recursively.")]
CleanOpt = Annotated[bool, typer.Option("--clean", help="Post-process raw captions: drop bracketed text, cut back "
                                                        "to the last '.' or ',', collapse whitespace.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 = greedy (deterministic); the origin script "
                                                             "sampled at 0.7.")]
TopKOpt = Annotated[int, typer.Option(min=0, help="Sample among the k best tokens (0 = off).")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
RepetitionOpt = Annotated[float, typer.Option(min=0.0, help="> 1 discourages repeats (1 = off).")]
NgramOpt = Annotated[int, typer.Option(min=0, help="Never repeat an n-gram of this size.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress; errors and nothing else.")]
ParquetOpt = Annotated[Path | None, typer.Option(help="Also write this run's records as a Parquet file "
                                                      "(needs pyarrow, which palionnx[ray] installs).")]
RayOpt = Annotated[str | None, typer.Option(help="Run as a Ray Data pipeline: 'local' (Ray on this machine), "
                                                 "'auto' (the running cluster) or a cluster address.")]
WorkersOpt = Annotated[int, typer.Option(min=1, help="With --ray: captioning actors (one model each).")]
GpusOpt = Annotated[float, typer.Option(min=0.0, help="With --ray: GPUs per actor.")]
CpusOpt = Annotated[float, typer.Option(min=0.0, help="With --ray: CPUs Ray reserves per actor; leave some on "
                                                      "each node for reading images.")]


@app.command()
def caption(
    inputs: Inputs, model: ModelOpt = DEFAULT_MODEL, quant: QuantOpt = "auto", ext: ExtOpt = ".txt",
    output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False, jsonl: JsonlOpt = None,
    prefix: PrefixOpt = "", suffix: SuffixOpt = "", prompt: PromptOpt = DEFAULT_PROMPT,
    max_new_tokens: MaxTokensOpt = DEFAULT_MAX_NEW_TOKENS, batch_size: BatchOpt = None,
    device: DeviceOpt = "auto", recursive: RecursiveOpt = True, clean: CleanOpt = False,
    temperature: TemperatureOpt = 0.0, top_k: TopKOpt = 0, top_p: TopPOpt = 1.0, seed: SeedOpt = None,
    repetition_penalty: RepetitionOpt = 1.0, no_repeat_ngram_size: NgramOpt = 0, quiet: QuietOpt = False,
    parquet: ParquetOpt = None, ray: RayOpt = None, workers: WorkersOpt = 1, gpus_per_worker: GpusOpt = 0.0,
    cpus_per_worker: CpusOpt = 1.0,
) -> None:
    """Caption images, writing a caption file beside each one (images that have one are skipped).

    Exit status: 0 when every image was captioned or skipped, 1 when some images failed,
    2 for usage errors, 130 when interrupted (re-run the same command to resume).

    \b
    Examples:
      palionnx caption input/
      palionnx caption input/ --model models/longprompt-int4 --prefix "sks, " --jsonl run.jsonl
      palionnx caption "photos/**/*.png" --output-dir captions/ --ext .caption
      palionnx caption /shared/dataset --ray auto --workers 8 --gpus-per-worker 1 --parquet run.parquet
    """
    from ..runtime.generate import make_logits_processors, make_sampler
    from .batch import BatchOptions, caption_files

    jobs = _find_jobs(inputs, ext, device, recursive)
    options = BatchOptions(
        ext=ext, output_dir=output_dir, overwrite=overwrite, jsonl=jsonl, parquet=parquet, prefix=prefix,
        suffix=suffix, clean=clean, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
        sampler=make_sampler(temperature, top_k, top_p, seed),
        logits_processors=make_logits_processors(repetition_penalty, no_repeat_ngram_size),
    )
    folder, captioner = _open_model(model, quant, device, ray)
    if ray:
        from .ray_pipeline import caption_with_ray

        if not quiet:
            _err(f"model {folder} on Ray ({ray}): {workers} worker(s), {gpus_per_worker} GPU each")
        summary = caption_with_ray(jobs, folder, options, device, ray, workers, gpus_per_worker, cpus_per_worker,
                                   quiet=quiet)
    else:
        assert captioner is not None
        if not quiet:
            _err(f"model {folder} ({captioner.manifest.quant.level}) on {captioner.providers[0]}")
        summary = caption_files(captioner, jobs, options, quiet=quiet)
    _err(summary.line())
    if summary.interrupted:
        raise typer.Exit(130)
    raise typer.Exit(1 if summary.failed else 0)


def _find_jobs(inputs: list[str], ext: str, device: str, recursive: bool) -> list[ImageJob]:
    """Check the options that need no model, then expand the inputs; exit 2 (or 0: no images) otherwise."""
    from ..runtime.sessions import DEVICES
    from .files import find_images

    if ext not in (".txt", ".caption"):
        _usage(f"--ext must be .txt or .caption, got {ext!r}")
    if device not in DEVICES:
        _usage(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    try:
        jobs = find_images(inputs, recursive=recursive)
    except FileNotFoundError as exc:
        _usage(str(exc))
    if not jobs:
        _err("no images found (extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)")
        raise typer.Exit(0)
    return jobs


def _open_model(model: str, quant: str, device: str, ray: str | None) -> tuple[Path, Captioner | None]:
    """Resolve --model to a folder (exporting a hub model on first use) and load it here, unless Ray
    actors will load it themselves. Any failure is a usage error (exit 2)."""
    from ..runtime.manifest import Manifest, ModelFolderError
    from ..runtime.sessions import DeviceError
    from .models import ModelResolveError, resolve_model

    try:
        folder = resolve_model(model, quant, device, progress=_err)
        if ray:
            from .ray_pipeline import require_ray

            require_ray()
            Manifest.load(folder)  # each actor loads the model itself
            return folder, None
        return folder, Captioner.load(folder, device=device)
    except (ModelResolveError, ModelFolderError, DeviceError, ImportError) as exc:
        _usage(str(exc))


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="Checkpoint folder, or a hub id such as google/paligemma-3b-pt-224.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model folder to write.")],
    quant: Annotated[str, typer.Option(help="Precision: auto (fp16 for CUDA, int4 for the CPU), fp32, fp16, int8 "
                                            "or int4.")] = "auto",
    device: Annotated[str, typer.Option(help="What the folder is built for: auto (CUDA if this machine's "
                                             "onnxruntime has it, else CPU), cpu or cuda. fp32 is CPU-only, fp16 "
                                             "CUDA-only; int8/int4 compute in float32 for the CPU, float16 for "
                                             "CUDA.")] = "auto",
    block_size: Annotated[int | None, typer.Option(
        help="Block size of int8/int4 weight quantization (default: measured on this CPU for a CPU folder, "
             f"{DEFAULT_BLOCK_SIZE} for CUDA).", show_default=False)] = None,
    cpu_kernels: Annotated[str, typer.Option(
        help="int8/int4 for the CPU: auto (time the candidates here and keep the fastest), nbits (MatMulNBits "
             "only: one decoder graph, least memory) or qgemm (int8 QGEMM for the vision encoder and prefill).")
    ] = "auto",
    validate: Annotated[
        bool, typer.Option("--validate", help="Afterwards, compare the folder with transformers on a few images.")
    ] = False,
) -> None:
    """Export a PaliGemma / PaliGemma 2 checkpoint to an ONNX model folder.

    Example: palionnx export ./paligemma-longprompt -o models/longprompt-int4 --quant int4 --device cpu
    """
    _need_export_extra()
    from ..export.checkpoint import CheckpointError
    from ..export.convert import ExportError
    from ..export.convert import export as run_export
    from ..runtime.levels import LevelError, resolve_quant

    try:
        quant = resolve_quant(quant, device)
        manifest = run_export(source, output, quant=quant, block_size=block_size, device=device, progress=_err,
                              kernels=cpu_kernels)
    except (CheckpointError, ExportError, LevelError) as exc:
        _err(f"error: {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"exported {manifest.family} at {quant} to {output} ({folder_size(output) / 1e9:.2f} GB)")
    if validate:
        from ..export.validate import validate as run_validate

        report = run_validate(source, output)
        typer.echo(report.summary())


@app.command()
def synth(
    geometry: Annotated[str, typer.Argument(help="pg1-3b-224, pg1-3b-448, pg2-3b-224, pg2-3b-448, "
                                                 "pg1-3b-224-l4, tiny-pg1 or tiny-pg2.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="Weight dtype on disk: float32 or bfloat16.")] = "float32",
) -> None:
    """Write a random-weight PaliGemma checkpoint of a real geometry (for latency tests, no download).

    Example: palionnx synth pg1-3b-224 -o checkpoints/pg1-3b-224
    """
    _need_export_extra()
    from ..export.synth import GEOMETRIES, write_checkpoint

    if geometry not in GEOMETRIES:
        _err(f"error: unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
        raise typer.Exit(2)
    write_checkpoint(geometry, output, seed=seed, dtype=dtype)
    typer.echo(f"wrote random-weight {geometry} checkpoint to {output}")


@app.command()
def info(model_dir: Annotated[Path, typer.Argument(help="An exported model folder.")]) -> None:
    """Show a model folder's manifest, graph sizes, quant level and this machine's execution providers.

    Example: palionnx info models/longprompt-int4
    """
    import onnxruntime as ort

    from ..runtime.contract import files_size, graph_files
    from ..runtime.manifest import Manifest, ModelFolderError

    try:
        m = Manifest.load(model_dir)
    except ModelFolderError as exc:
        _usage(str(exc))
    typer.echo(f"folder        {model_dir}")
    typer.echo(f"source        {m.source.get('id')} (revision {m.source.get('revision') or '-'})")
    typer.echo(f"family        {m.family} ({'Gemma 2' if m.family == 'pg2' else 'Gemma'} decoder), "
               f"exported by palionnx {m.palionnx_version}, opset {m.opset}")
    quant = {k: v for k, v in m.quant.to_json().items() if k not in ("fp32_kept", "cpu_kernels")}
    typer.echo(f"quant         {', '.join(f'{k}={v}' for k, v in quant.items())}")
    if m.quant.cpu_kernels:
        kernels = m.quant.cpu_kernels
        where = f" on {kernels.cpu}" if kernels.cpu else ""
        typer.echo(f"kernels       vision {kernels.vision}, prefill {kernels.prefill}, decode {kernels.decode} "
                   f"(chosen by {kernels.chosen_by}{where})")
    typer.echo(f"built for     {m.device} ({m.kv_dtype} compute)")
    typer.echo(f"image         {m.image_size}px -> {m.image_seq_length} tokens, mean {m.image_mean}, "
               f"std {m.image_std}, {m.resample}")
    typer.echo(f"decoder       {m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} kv heads "
               f"x {m.head_dim}, vocab {m.vocab_size}, sliding window {m.sliding_window or '-'}, kv {m.kv_dtype}")
    typer.echo(f"tokens        bos {m.bos_token_id}, eos {m.eos_token_ids}, image {m.image_token_id}, "
               f"prompt {m.prompt_template!r}")
    for role, graph in m.graphs.items():
        size = files_size(graph_files(model_dir, role))
        typer.echo(f"graph         {role:15s} {graph.file:28s} {size / 1e6:10.1f} MB")
    typer.echo(f"total         {folder_size(model_dir) / 1e6:.1f} MB")
    typer.echo(f"providers     {', '.join(ort.get_available_providers())} (onnxruntime {ort.__version__})")


@app.command()
def bench(
    model_dirs: Annotated[list[Path], typer.Argument(help="Exported model folders, e.g. one per quant level.")],
    images: Annotated[int, typer.Option(min=1, help="Synthetic images per run.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated per image (eos ignored).")] = 32,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs after the warm-up; the median is reported.")] = 3,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON here.")] = None,
) -> None:
    """Latency per model folder: load, vision, prefill, decode per token, throughput, memory, size.

    Each folder runs in its own process with a fixed generated length; a warm-up run is excluded.

    Example: palionnx bench models/pg1-fp32 models/pg1-int8 models/pg1-int4 --max-new-tokens 64
    """
    import json

    from ..runtime.measure import measure_in_subprocess
    from .bench import kernels, table

    rows = []
    for folder in model_dirs:
        if not (folder / MANIFEST_NAME).is_file():
            _usage(f"{folder} is not a palionnx model folder (no {MANIFEST_NAME})")
        _err(f"benchmarking {folder} ...")
        try:
            rows.append(measure_in_subprocess(folder, images=images, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, device=device, repeats=repeats))
        except RuntimeError as exc:
            _err(f"error: {exc}")
            raise typer.Exit(1) from None
    typer.echo(table(rows))
    if kernels(rows):
        typer.echo(kernels(rows))
    if json_file:
        json_file.write_text(json.dumps(rows, indent=2) + "\n")


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="An exported model folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    slots: Annotated[int | None, typer.Option(min=1, help="Captions decoded together (default 64 on CUDA, 4 on "
                                                          "the CPU).", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    max_queue: Annotated[int, typer.Option(min=1, help="Requests allowed to wait for a slot; more get 503.")] = 256,
    timeout: Annotated[float, typer.Option(min=0.01, help="Seconds a request may take, waiting included; "
                                                          "then 504.")] = 120.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest caption a request may ask for (and the "
                                                            "default).")] = DEFAULT_MAX_NEW_TOKENS,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body; bigger gets 413.")] = 20.0,
) -> None:
    """Serve captions over HTTP: POST /v1/caption, POST /v1/chat/completions (OpenAI-compatible),
    GET /healthz, GET /metrics. Concurrent requests share decode steps. SIGTERM or Ctrl-C finish the
    requests in flight, then exit. Needs the serve extra: pip install 'palionnx[serve]'.

    Example: palionnx serve models/pg-int4 --port 8000 --slots 8
    """
    from ..runtime.manifest import ModelFolderError
    from ..runtime.sessions import DeviceError
    from ..server.serve import ServeExtraMissing, ServeOptions, require_serve_extra
    from ..server.serve import serve as run_server

    options = ServeOptions(host=host, port=port, slots=slots, device=device, max_queue=max_queue, timeout_s=timeout,
                           max_new_tokens=max_new_tokens, max_body_mb=max_body_mb)
    try:
        require_serve_extra()
        run_server(model_dir, options, say=_err)
    except (ServeExtraMissing, ModelFolderError, DeviceError) as exc:
        _usage(str(exc))


def _usage(message: str) -> NoReturn:
    _err(f"error: {message}")
    raise typer.Exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="palionnx")

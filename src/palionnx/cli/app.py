"""The `palionnx` command: a thin typer layer over palionnx.export and palionnx.runtime."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..runtime.captioner import Captioner
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


@app.command()
def caption(
    inputs: Annotated[list[str], typer.Argument(
        metavar="INPUT...", help="Image files, folders (searched recursively) or quoted globs.", show_default=False
    )],
    model: Annotated[str, typer.Option(help="Exported model folder, or a hub id exported on first use into the "
                                            "cache (~/.cache/palionnx, or $PALIONNX_CACHE).")] = DEFAULT_MODEL,
    quant: Annotated[str, typer.Option(help="Precision when --model is a hub id exported on first use.")] = "int4",
    ext: Annotated[str, typer.Option(help="Caption file extension: .txt or .caption.")] = ".txt",
    output_dir: Annotated[Path | None, typer.Option(help="Write captions here, mirroring the input folders, "
                                                            "instead of beside the images.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite/--skip-existing",
                                            help="Replace existing captions, or skip their images.")] = False,
    jsonl: Annotated[Path | None, typer.Option(help="Append one JSON record per image to this file "
                                                       "(path, caption, tokens, timings, error).")] = None,
    prefix: Annotated[str, typer.Option(help='Text put before every caption, e.g. "sks, ".')] = "",
    suffix: Annotated[str, typer.Option(help="Text put after every caption.")] = "",
    prompt: Annotated[str, typer.Option(help="Prompt given to the model.")] = "caption en",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest caption, in tokens.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Images captioned together.")] = 4,
    device: Annotated[str, typer.Option(help="auto (CUDA if it works, else CPU), cuda or cpu.")] = "auto",
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Search folders recursively.")] = True,
    clean: Annotated[bool, typer.Option("--clean", help="Post-process raw captions: drop bracketed text, cut back "
                                                        "to the last '.' or ',', collapse whitespace.")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (deterministic); the origin script "
                                                             "sampled at 0.7.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k best tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    repetition_penalty: Annotated[float, typer.Option(min=0.0, help="> 1 discourages repeats (1 = off).")] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(min=0, help="Never repeat an n-gram of this size.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress; errors and nothing else.")] = False,
    parquet: Annotated[Path | None, typer.Option(help="Also write this run's records as a Parquet file "
                                                      "(needs pyarrow, which palionnx[ray] installs).")] = None,
    ray: Annotated[str | None, typer.Option(help="Run as a Ray Data pipeline: 'local' (Ray on this machine), "
                                                 "'auto' (the running cluster) or a cluster address.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --ray: captioning actors (one model each).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, help="With --ray: GPUs per actor.")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option(min=0.0, help="With --ray: CPUs Ray reserves per actor; "
                                                                 "leave some on each node for reading images.")] = 1.0,
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
    from ..runtime.manifest import Manifest, ModelFolderError
    from ..runtime.sessions import DEVICES, DeviceError
    from .batch import BatchOptions, caption_files
    from .files import find_images
    from .models import ModelResolveError, resolve_model

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
    options = BatchOptions(
        ext=ext, output_dir=output_dir, overwrite=overwrite, jsonl=jsonl, parquet=parquet, prefix=prefix,
        suffix=suffix, clean=clean, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
        generation=dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size),
    )
    try:
        folder = resolve_model(model, quant, progress=_err)
        if ray:
            from .ray_pipeline import caption_with_ray, require_ray

            require_ray()
            Manifest.load(folder)  # each actor loads the model itself
        else:
            captioner = Captioner.load(folder, device=device)
    except (ModelResolveError, ModelFolderError, DeviceError, ImportError) as exc:
        _usage(str(exc))
    if ray:
        if not quiet:
            _err(f"model {folder} on Ray ({ray}): {workers} worker(s), {gpus_per_worker} GPU each")
        summary = caption_with_ray(jobs, folder, options, device, ray, workers, gpus_per_worker, cpus_per_worker,
                                   quiet=quiet)
    else:
        if not quiet:
            _err(f"model {folder} ({captioner.manifest.quant['level']}) on {captioner.providers[0]}")
        summary = caption_files(captioner, jobs, options, quiet=quiet)
    _err(summary.line())
    if summary.interrupted:
        raise typer.Exit(130)
    raise typer.Exit(1 if summary.failed else 0)


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="Checkpoint folder, or a hub id such as google/paligemma-3b-pt-224.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model folder to write.")],
    quant: Annotated[str, typer.Option(help="Precision: fp32, fp16, int8 or int4.")] = "int4",
    block_size: Annotated[int, typer.Option(help="Block size of int8/int4 weight quantization.")] = 32,
    validate: Annotated[
        bool, typer.Option("--validate", help="Afterwards, compare the folder with transformers on a few images.")
    ] = False,
) -> None:
    """Export a PaliGemma / PaliGemma 2 checkpoint to an ONNX model folder.

    Example: palionnx export ./paligemma-longprompt -o models/longprompt-int4 --quant int4
    """
    _need_export_extra()
    from ..export.checkpoint import CheckpointError
    from ..export.convert import ExportError
    from ..export.convert import export as run_export

    try:
        manifest = run_export(source, output, quant=quant, block_size=block_size, progress=_err)
    except (CheckpointError, ExportError) as exc:
        _err(f"error: {exc}")
        raise typer.Exit(2) from None
    sizes = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    typer.echo(f"exported {manifest.family} at {quant} to {output} ({sizes / 1e9:.2f} GB)")
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

    from ..runtime.manifest import Manifest, ModelFolderError

    try:
        m = Manifest.load(model_dir)
    except ModelFolderError as exc:
        _usage(str(exc))
    typer.echo(f"folder        {model_dir}")
    typer.echo(f"source        {m.source.get('id')} (revision {m.source.get('revision') or '-'})")
    typer.echo(f"family        {m.family} ({'Gemma 2' if m.family == 'pg2' else 'Gemma'} decoder), "
               f"exported by palionnx {m.palionnx_version}, opset {m.opset}")
    typer.echo(f"quant         {', '.join(f'{k}={v}' for k, v in m.quant.items() if k != 'fp32_kept')}")
    typer.echo(f"image         {m.image_size}px -> {m.image_seq_length} tokens, mean {m.image_mean}, "
               f"std {m.image_std}, {m.resample}")
    typer.echo(f"decoder       {m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} kv heads "
               f"x {m.head_dim}, vocab {m.vocab_size}, sliding window {m.sliding_window or '-'}, kv {m.kv_dtype}")
    typer.echo(f"tokens        bos {m.bos_token_id}, eos {m.eos_token_ids}, image {m.image_token_id}, "
               f"prompt {m.prompt_template!r}")
    total = 0
    for role, graph in m.graphs.items():
        files = [model_dir / graph.file, model_dir / (graph.file + ".data")]
        size = sum(f.stat().st_size for f in files if f.exists())
        total += size
        typer.echo(f"graph         {role:15s} {graph.file:28s} {size / 1e6:10.1f} MB")
    typer.echo(f"total         {total / 1e6:.1f} MB")
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

    from .bench import measure_in_subprocess, table

    rows = []
    for folder in model_dirs:
        if not (folder / "palionnx.json").is_file():
            _usage(f"{folder} is not a palionnx model folder (no palionnx.json)")
        _err(f"benchmarking {folder} ...")
        try:
            rows.append(measure_in_subprocess(folder, images, max_new_tokens, batch_size, device, repeats))
        except RuntimeError as exc:
            _err(f"error: {exc}")
            raise typer.Exit(1) from None
    typer.echo(table(rows))
    if json_file:
        json_file.write_text(json.dumps(rows, indent=2) + "\n")


def _usage(message: str) -> NoReturn:
    _err(f"error: {message}")
    raise typer.Exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="palionnx")

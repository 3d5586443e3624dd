"""The `palionnx` command: a thin typer layer over palionnx.export and palionnx.runtime.

Options of each command are declared once at the top (with their help panel: input and output, model,
generation, performance, Ray); the commands' bodies call helpers in the modules beside this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from ..export.options import ExportOptions
from ..jobs.options import CaptionOptions, RayOptions
from ..jobs.plan import Plan
from ..jobs.records import Summary
from ..runtime.captioner import Captioner
from ..runtime.contract import folder_size
from ..runtime.defaults import (
    CUDA_INT4_BLOCK_SIZE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CUDA_BATCH_SIZE,
    DEFAULT_SERVE_CPU_SLOTS,
)
from ..server.options import ServeOptions
from .helpformat import CleanGroup
from .models import DEFAULT_MODEL
from .presets import apply_preset

SERVE = ServeOptions()  # `serve`'s defaults, declared in server/options.py
CAPTION, RAY = CaptionOptions(), RayOptions()  # `caption`'s defaults, declared in jobs/options.py
# `export`'s defaults are ExportOptions' class attributes (export/options.py): an instance resolves "auto"

app = typer.Typer(
    cls=CleanGroup,
    invoke_without_command=True,  # no command: the help (see `overview`)
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # paragraphs reflow; examples are indented code blocks
    context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]},
)


@app.callback()
def overview(ctx: typer.Context) -> None:
    """Caption images with PaliGemma through ONNX Runtime. Export a checkpoint once, run it anywhere.

    Start with `palionnx doctor`, then `palionnx caption FOLDER`.
    """
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _usage(message: str) -> NoReturn:
    _err(f"error: {message}")
    raise typer.Exit(2)


def _check_device(device: str) -> None:
    """--device is one of the devices palionnx knows (exit 2 otherwise)."""
    from ..runtime.sessions import DEVICES

    if device not in DEVICES:
        _usage(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")


def _need_export_extra() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        _usage("exporting needs the export extra: pip install 'palionnx[export]' (see README, Install)")


IO_PANEL, MODEL_PANEL, GENERATION_PANEL, PERFORMANCE_PANEL, RAY_PANEL = (
    "Input and output", "Model", "Generation", "Performance", "Ray (several machines)")

# Options of `caption`, declared once here so the command's signature stays readable.
Inputs = Annotated[list[str], typer.Argument(
    metavar="INPUT...", help="Image files, folders (searched recursively) or quoted globs.", show_default=False)]
ExtOpt = Annotated[str, typer.Option(metavar="EXT", rich_help_panel=IO_PANEL,
                                     help="Caption file extension: .txt or .caption.")]
OutputDirOpt = Annotated[Path | None, typer.Option(metavar="FOLDER", rich_help_panel=IO_PANEL, help=(
    "Write captions here, mirroring the input folders, instead of beside the images."))]
ExistingOpt = Annotated[str, typer.Option(metavar="MODE", rich_help_panel=IO_PANEL, help=(
    "An image that has a caption file: skip it, overwrite the file, or append / prepend the new caption to its "
    "text (joined by --separator). Re-running an interrupted append adds to each image once."))]
OverwriteOpt = Annotated[bool | None, typer.Option("--overwrite/--skip-existing", rich_help_panel=IO_PANEL,
                                                   help="Short for --existing overwrite / --existing skip.",
                                                   show_default=False)]
SeparatorOpt = Annotated[str, typer.Option(metavar="TEXT", rich_help_panel=IO_PANEL, help=(
    "With --existing append / prepend: put between the existing text and the new caption (a line break with "
    "several captions per image)."))]
CaptionsPerImageOpt = Annotated[int, typer.Option(min=1, metavar="N", rich_help_panel=IO_PANEL, help=(
    "With sampling: N captions per image, one per line of its caption file (kohya's sd-scripts pick one line "
    "per epoch); each is a request of its own in the batch; --jsonl lists them."))]
JsonlOpt = Annotated[Path | None, typer.Option(metavar="FILE", rich_help_panel=IO_PANEL, help=(
    "Append one JSON record per image to this file (path, status, caption, tokens, timings, error)."))]
ParquetOpt = Annotated[Path | None, typer.Option(metavar="FILE", rich_help_panel=IO_PANEL, help=(
    "Also write this run's records as a Parquet file (needs pyarrow, which palionnx[ray] installs)."))]
PrefixOpt = Annotated[str, typer.Option(metavar="TEXT", rich_help_panel=IO_PANEL,
                                        help='Text put before every caption, e.g. "sks, ".')]
SuffixOpt = Annotated[str, typer.Option(metavar="TEXT", rich_help_panel=IO_PANEL, help="Text put after every caption.")]
CleanOpt = Annotated[bool, typer.Option("--clean/--no-clean", rich_help_panel=IO_PANEL, help=(
    "Post-process raw captions in --clean-style (--clean basic / --clean origin pick the style too)."))]
CleanStyleOpt = Annotated[str, typer.Option(metavar="STYLE", rich_help_panel=IO_PANEL, help=(
    "basic: drop bracketed text, cut back to the last '.' or ',', collapse whitespace; origin: exactly the "
    "origin script's clean-up (palionnx.clean_caption)."))]
ExcludeTagsOpt = Annotated[str, typer.Option(metavar="TAGS", rich_help_panel=IO_PANEL, help=(
    "Drop these tags (a,b,c, or @FILE: one per line) from the caption's leading tags, wherever they stand."))]
TagUnderscoresOpt = Annotated[str, typer.Option(metavar="RULE", rich_help_panel=IO_PANEL, help=(
    "In the leading tags: keep underscores, make them spaces (as kohya's taggers), or drop the tags holding one "
    "(as the origin script)."))]
MaxTagsOpt = Annotated[int, typer.Option(min=0, metavar="N", rich_help_panel=IO_PANEL, help=(
    "Keep at most N leading tags (0: all). Any tag option also drops duplicate tags."))]
RecursiveOpt = Annotated[bool, typer.Option("--recursive/--no-recursive", rich_help_panel=IO_PANEL,
                                            help="Search folders recursively.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=IO_PANEL,
                                        help="Print errors and nothing else (no progress, no summary).")]
ModelOpt = Annotated[str, typer.Option(metavar="MODEL", rich_help_panel=MODEL_PANEL, help=(
    "An exported model folder, or a hub id OWNER/NAME: a pre-exported repository is downloaded as it is, a "
    "checkpoint is exported once into the cache (~/.cache/palionnx or $PALIONNX_CACHE; needs palionnx[export])."))]
QuantOpt = Annotated[str | None, typer.Option(metavar="LEVEL", rich_help_panel=MODEL_PANEL, help=(
    "auto, fp32, fp16, bf16, int8 or int4: the level a hub checkpoint is exported at on first use (default auto: fp16 "
    "where CUDA runs, int4 on the CPU), or picked among a pre-exported repository's levels."), show_default=False)]
DeviceOpt = Annotated[str, typer.Option(metavar="DEVICE", rich_help_panel=MODEL_PANEL, help=(
    "auto (CUDA if it works, else CPU), cpu, cuda, directml (Windows) or coreml (macOS). An accelerator asked "
    "for by name that does not start is an error, never a silent CPU run."))]
PromptOpt = Annotated[str, typer.Option(metavar="TEXT", rich_help_panel=GENERATION_PANEL, help=(
    "Prompt given to the model (plain text: special tokens such as <image> are refused)."))]
MaxTokensOpt = Annotated[int, typer.Option(min=1, metavar="N", rich_help_panel=GENERATION_PANEL, help=(
    "Longest caption, in tokens (at most the model's context minus the prompt)."))]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, metavar="T", rich_help_panel=GENERATION_PANEL, help=(
    "0 = greedy (deterministic); above 0 samples (the origin script used 0.7)."))]
TopKOpt = Annotated[int, typer.Option(min=0, metavar="K", rich_help_panel=GENERATION_PANEL,
                                      help="With --temperature: sample among the K best tokens (0 = off).")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, metavar="P", rich_help_panel=GENERATION_PANEL,
                                        help="With --temperature: nucleus sampling mass (1 = off).")]
SeedOpt = Annotated[int | None, typer.Option(min=0, metavar="N", rich_help_panel=GENERATION_PANEL,
                                             help="With --temperature: seed for reproducible sampling.")]
RepetitionOpt = Annotated[float, typer.Option(metavar="X", rich_help_panel=GENERATION_PANEL,
                                              help="Above 1 discourages repeats (1 = off; must be above 0).")]
NgramOpt = Annotated[int, typer.Option(min=0, metavar="N", rich_help_panel=GENERATION_PANEL,
                                       help="Never repeat an n-gram of this size (0 = off).")]
MinWordsOpt = Annotated[int, typer.Option(min=0, metavar="N", rich_help_panel=GENERATION_PANEL, help=(
    "With --retries and sampling: caption an image again while its caption has fewer words (counted after "
    "--clean; with --clean-style origin in the pruned raw caption, as the origin script counts)."))]
RetryWordsOpt = Annotated[str, typer.Option(metavar="WORD,...", rich_help_panel=GENERATION_PANEL, help=(
    "With --retries and sampling: caption an image again while its caption holds one of these (read as "
    "--min-words reads it)."))]
KeepOpt = Annotated[str, typer.Option(metavar="WHICH", rich_help_panel=GENERATION_PANEL, help=(
    "Of an image's attempts keep the longest (most words) or the last (as the origin script)."))]
RetriesOpt = Annotated[int, typer.Option(min=0, metavar="N", rich_help_panel=GENERATION_PANEL, help=(
    "With --min-words: at most this many more captions per image (--jsonl records the attempts)."))]
PresetOpt = Annotated[str | None, typer.Option(
    metavar="NAME", is_eager=True, callback=apply_preset, rich_help_panel=GENERATION_PANEL, show_default=False,
    help=("origin: the origin script's settings (--temperature 0.7 --top-k 50 --top-p 0.9 --repetition-penalty "
          "1.15 --no-repeat-ngram-size 2 --max-new-tokens 256 --min-words 20 --retry-words no_parallel --retries 9 "
          "--keep last --clean --clean-style origin); options given explicitly win."))]
BatchOpt = Annotated[int | None, typer.Option(min=1, metavar="N", rich_help_panel=PERFORMANCE_PANEL, help=(
    f"Captions decoded together (default {DEFAULT_CUDA_BATCH_SIZE} on CUDA, {DEFAULT_BATCH_SIZE} on the CPU); each "
    "slot takes the next image as soon as its caption ends."), show_default=False)]
CudaGraphOpt = Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", rich_help_panel=PERFORMANCE_PANEL,
                                            help="On CUDA, replay each decode step as a captured CUDA graph.")]
MaxMemoryOpt = Annotated[float | None, typer.Option(min=0.0, metavar="GB", rich_help_panel=PERFORMANCE_PANEL, help=(
    "Refuse requests whose estimated KV cache and attention memory exceed this many GB (default: the RAM, or "
    "GPU memory, free when the model has loaded)."), show_default=False)]
RayOpt = Annotated[str | None, typer.Option(metavar="ADDRESS", rich_help_panel=RAY_PANEL, help=(
    "Run as a Ray Data pipeline: 'local' (Ray on this machine), 'auto' (the running cluster) or an address."))]
WorkersOpt = Annotated[int, typer.Option(min=1, metavar="N", rich_help_panel=RAY_PANEL,
                                         help="With --ray: captioning actors (one model each).")]
GpusOpt = Annotated[float, typer.Option(min=0.0, metavar="N", rich_help_panel=RAY_PANEL,
                                        help="With --ray: GPUs per actor.")]
CpusOpt = Annotated[float, typer.Option(min=0.0, metavar="N", rich_help_panel=RAY_PANEL, help=(
    "With --ray: CPUs Ray reserves per actor; leave some on each node for reading images."))]


@app.command()
def caption(
    inputs: Inputs, model: ModelOpt = DEFAULT_MODEL, quant: QuantOpt = None, ext: ExtOpt = CAPTION.ext,
    output_dir: OutputDirOpt = CAPTION.output_dir, existing: ExistingOpt = CAPTION.existing,
    overwrite: OverwriteOpt = None, separator: SeparatorOpt = CAPTION.separator,
    captions_per_image: CaptionsPerImageOpt = CAPTION.captions_per_image,
    jsonl: JsonlOpt = CAPTION.jsonl, prefix: PrefixOpt = CAPTION.prefix, suffix: SuffixOpt = CAPTION.suffix,
    prompt: PromptOpt = CAPTION.prompt, max_new_tokens: MaxTokensOpt = CAPTION.max_new_tokens,
    batch_size: BatchOpt = CAPTION.batch_size, device: DeviceOpt = "auto", recursive: RecursiveOpt = CAPTION.recursive,
    clean: CleanOpt = CAPTION.clean, temperature: TemperatureOpt = CAPTION.temperature, top_k: TopKOpt = CAPTION.top_k,
    top_p: TopPOpt = CAPTION.top_p, seed: SeedOpt = CAPTION.seed,
    repetition_penalty: RepetitionOpt = CAPTION.repetition_penalty,
    no_repeat_ngram_size: NgramOpt = CAPTION.no_repeat_ngram_size, quiet: QuietOpt = False,
    max_memory: MaxMemoryOpt = CAPTION.max_memory_gb, parquet: ParquetOpt = CAPTION.parquet, ray: RayOpt = None,
    workers: WorkersOpt = RAY.workers, gpus_per_worker: GpusOpt = RAY.gpus_per_worker,
    cpus_per_worker: CpusOpt = RAY.cpus_per_worker, cuda_graph: CudaGraphOpt = CAPTION.cuda_graph,
    min_words: MinWordsOpt = CAPTION.min_words, retries: RetriesOpt = CAPTION.retries, preset: PresetOpt = None,
    clean_style: CleanStyleOpt = CAPTION.clean_style, retry_words: RetryWordsOpt = "",
    keep: KeepOpt = CAPTION.keep, exclude_tags: ExcludeTagsOpt = "",
    tag_underscores: TagUnderscoresOpt = CAPTION.tag_underscores, max_tags: MaxTagsOpt = CAPTION.max_tags,
) -> None:
    """Caption images, writing a caption file beside each one (images that have one are skipped).

    Several runs may share one folder (one per GPU, say): each image is captioned by exactly one of them.
    Two images of the same name (a.gif, a.webp) share a.txt: the first in sorted order gets it, the other is
    reported as a name clash. Exit status: 0 when every image was captioned or skipped, 1 when some images
    failed, 2 for usage, input and model-folder errors (before any work), 130 when interrupted (re-run the
    same command to resume).

    Examples:

        palionnx caption input/
        palionnx caption input/ --model models/pg-int4 --prefix "sks, " --jsonl run.jsonl
        palionnx caption input/ --preset origin --seed 0     # the origin script's sampling, retries, clean-up
        palionnx caption "photos/**/*.png" --output-dir captions/ --ext .caption
        palionnx caption /shared/dataset --ray auto --workers 8 --gpus-per-worker 1
    """
    options = CaptionOptions(
        ext=ext, output_dir=output_dir, existing=_existing(existing, overwrite), separator=separator,
        captions_per_image=captions_per_image, jsonl=jsonl, parquet=parquet, prefix=prefix,
        suffix=suffix, clean=clean, recursive=recursive, prompt=prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_words=min_words, retries=retries, batch_size=batch_size,
        max_memory_gb=max_memory, cuda_graph=cuda_graph, clean_style=clean_style, keep=keep,
        retry_words=tuple(word.strip() for word in retry_words.split(",") if word.strip()),
        exclude_tags=_tag_list(exclude_tags), tag_underscores=tag_underscores, max_tags=max_tags)
    ray_options = RayOptions(ray, workers, gpus_per_worker, cpus_per_worker) if ray else None
    if ray and options.adds:
        _usage(f"--existing {options.existing} is not available with --ray (a retried Ray task could add twice): "
               "caption without --ray, or use skip or overwrite")
    plan = _plan_caption(inputs, options, device, quiet)
    folder, captioner = _open_model(model, quant, device, ray, quiet, cuda_graph)
    summary = _run_caption(plan, folder, captioner, options, ray_options, device, quiet)
    if not quiet:
        _err(summary.line())
    if summary.interrupted:
        raise typer.Exit(130)
    raise typer.Exit(1 if summary.failed else 0)


def _existing(existing: str, overwrite: bool | None) -> str:
    """--existing, or what its aliases --overwrite / --skip-existing say (both given: they must agree)."""
    if overwrite is None:
        return existing
    alias = "overwrite" if overwrite else "skip"
    if existing not in (alias, CAPTION.existing):
        _usage(f"--{'overwrite' if overwrite else 'skip-existing'} contradicts --existing {existing}")
    return alias


def _plan_caption(inputs: list[str], options: CaptionOptions, device: str, quiet: bool) -> Plan:
    """Check the options, find the images and plan the run (name clashes reported) before any model loads;
    exit 2 on a usage error, 0 when there are no images."""
    from ..jobs.checks import CheckError, check_options, check_outputs
    from ..jobs.files import find_images
    from ..jobs.plan import plan_run

    try:
        check_options(options)
        _check_device(device)
        jobs = find_images(inputs, recursive=options.recursive)
        if not jobs:
            _err("no images found (extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)")
            raise typer.Exit(0)
        plan = plan_run(jobs, options, quiet)
        check_outputs(options, plan)
    except (CheckError, FileNotFoundError) as exc:
        _usage(str(exc))
    return plan


def _run_caption(plan: Plan, folder: Path, captioner: Captioner | None, options: CaptionOptions,
                 ray_options: RayOptions | None, device: str, quiet: bool) -> Summary:
    """Caption the planned images here or on Ray; a request the model cannot serve is a usage error."""
    from ..jobs.captioning import caption_files, fit_batch
    from ..jobs.ray_pipeline import caption_with_ray
    from ..runtime.limits import RequestError

    say = None if quiet else _err
    try:
        if ray_options:
            return caption_with_ray(plan, folder, options, ray_options, device, quiet=quiet, say=say)
        assert captioner is not None
        options = fit_batch(captioner, options, len(plan.todo), say)
    except RequestError as exc:
        _usage(str(exc))
    if say:
        say(f"model {captioner.folder} ({captioner.manifest.quant.level}) on {captioner.providers[0]}")
    return caption_files(captioner, plan, options, quiet=quiet)


def _open_model(model: str, quant: str | None, device: str, ray: str | None, quiet: bool,
                cuda_graph: bool = True) -> tuple[Path, Captioner | None]:
    """Resolve --model to a folder (downloading or exporting a hub model on first use) and load it here,
    unless Ray actors will load it themselves. Any failure is a usage error (exit 2)."""
    from ..jobs.progress import Steps
    from ..runtime.manifest import Manifest, ModelFolderError
    from ..runtime.sessions import DeviceError
    from .models import ModelResolveError, resolve_model

    try:
        with Steps(quiet=quiet) as steps:
            folder = resolve_model(model, quant, device, progress=steps.say)
        if ray:
            from ..jobs.ray_pipeline import require_ray

            require_ray()
            Manifest.load(folder)  # each actor loads the model itself
            return folder, None
        return folder, Captioner.load(folder, device=device, cuda_graph=cuda_graph)
    except (ModelResolveError, ModelFolderError, DeviceError, ImportError) as exc:
        _usage(str(exc))


def _check_export_plan(source: str, quant: str, output: Path, say: Any) -> None:
    """Say what exporting the checkpoint folder `source` costs and refuse, before any work, when this machine
    lacks the RAM or disk (a hub id is planned where it is downloaded: cli/models.py).

    A folder too big to caption with here is only noted: it may be exported for a bigger machine."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    from ..export.options import ExportError
    from ..system import memory
    from .export_plan import free_disk, local_estimate, shortfall
    from .tables import human_bytes

    available = memory()
    plan = local_estimate(folder, quant, available.total if available else None)
    say(f"needs: {plan.describe()}")
    problem = shortfall(plan, available.available if available else None, free_disk(output))
    if problem:
        raise ExportError(f"cannot export {folder} at {quant} on this machine: {problem}")
    if available and plan.run_ram_bytes > available.total:
        say(f"note: captioning with it needs about {human_bytes(plan.run_ram_bytes)} of RAM and this machine has "
            f"{human_bytes(available.total)}: run it on a bigger one")


@app.command()
def export(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help=(
        "Checkpoint folder, or a hub id such as google/paligemma-3b-pt-224."))],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FOLDER", help=(
        "Model folder to write. It appears only when complete; a model folder there is replaced."))],
    quant: Annotated[str, typer.Option(metavar="LEVEL", help=(
        "Precision: auto (fp16 for CUDA, int4 for the CPU), fp32, fp16, bf16 (CUDA only), int8 or int4."))
    ] = ExportOptions.quant,
    device: Annotated[str, typer.Option(metavar="DEVICE", help=(
        "What the folder is built for: auto (CUDA if this machine's onnxruntime has it, else the CPU), cpu or "
        "cuda. fp32 is the CPU level, fp16 and bf16 the CUDA ones; int8/int4 compute in float32 for the CPU and in "
        "float16 for CUDA."))] = ExportOptions.device,
    block_size: Annotated[int | None, typer.Option(metavar="N", show_default=False, help=(
        "Block size of int8/int4 weight quantization (default: measured on this CPU for a CPU folder; for "
        f"CUDA {CUDA_INT4_BLOCK_SIZE} at int4, {DEFAULT_BLOCK_SIZE} at int8)."))] = ExportOptions.block_size,
    cpu_kernels: Annotated[str, typer.Option(metavar="KERNELS", help=(
        "int8/int4 for the CPU: auto (time the candidates here and keep the fastest), nbits (MatMulNBits "
        "only: one decoder graph, least memory) or qgemm (int8 QGEMM for the vision encoder and prefill)."))
    ] = ExportOptions.kernels,
    calibration: Annotated[Path | None, typer.Option(metavar="FOLDER", show_default=False, help=(
        "int8/int4 for the CPU: images the float model runs on at export to find each layer's activation "
        "outliers (default: the packaged sample images and procedural scenes; up to 32 are used)."))
    ] = ExportOptions.calibration,
    measure_kernels: Annotated[bool, typer.Option("--measure-kernels", help=(
        "Time the CPU kernels even for a small decoder (under 50 M parameters the defaults are kept)."))
    ] = ExportOptions.always_measure,
    validate: Annotated[
        bool, typer.Option("--validate", help="Afterwards, compare the folder with transformers on a few images.")
    ] = False,
) -> None:
    """Export a PaliGemma / PaliGemma 2 checkpoint to an ONNX model folder.

    Example: palionnx export ./paligemma-longprompt -o models/longprompt-int4 --quant int4 --device cpu
    """
    from ..export.options import ExportError
    from ..export.output import OutputError, check_output

    try:
        check_output(output)  # before anything slow: a file or a foreign folder at -o is refused at once
        options = ExportOptions(quant=quant, block_size=block_size, device=device, kernels=cpu_kernels,
                                calibration=calibration, always_measure=measure_kernels)
    except (OutputError, ExportError) as exc:
        _usage(str(exc))
    _need_export_extra()
    from ..export.checkpoint import CheckpointError
    from ..export.convert import export as run_export
    from ..jobs.progress import Steps

    try:
        with Steps() as steps:
            _check_export_plan(source, options.quant, output, steps.say)
            manifest = run_export(source, output, options, progress=steps.say)
    except (CheckpointError, ExportError, OutputError) as exc:
        _usage(str(exc))
    typer.echo(f"exported {manifest.family} at {options.quant} to {output} ({folder_size(output) / 1e9:.2f} GB)")
    if validate:
        from ..export.validate import validate as run_validate

        report = run_validate(source, output)
        typer.echo(report.summary())


@app.command()
def synth(
    geometry: Annotated[str, typer.Argument(metavar="GEOMETRY", help=(
        "pg1-3b-, pg2-3b-, pg2-10b- or pg2-28b- with 224, 448 or 896; their -l4 variants (4 layers at the real "
        "widths: the 224 ones and pg2-28b-*); tiny-pg1, tiny-pg2, tiny-pg2-28b (random weights); "
        "shapes-pg1 or shapes-pg2 (trained here on procedural scenes, once, then taken from the cache)."))],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FOLDER", help="Checkpoint folder to write.")],
    seed: Annotated[int, typer.Option(min=0, metavar="N", help="Seed of the random weights.")] = 0,
    dtype: Annotated[str, typer.Option(metavar="DTYPE", help="Weight dtype on disk: float32 or bfloat16.")] = "float32",
) -> None:
    """Write a random-weight PaliGemma checkpoint of a real geometry (for latency tests, no download), or a
    small one trained on procedural scenes (shapes-pg1, shapes-pg2: `palionnx eval` scores them).

    The trained ones are trained on the CPU on first use (minutes) into the cache (~/.cache/palionnx or
    $PALIONNX_CACHE), keyed by the code that makes them, then copied out.

    Examples:

        palionnx synth pg1-3b-224 -o checkpoints/pg1-3b-224
        palionnx synth shapes-pg1 -o checkpoints/shapes-pg1
    """
    _need_export_extra()
    from ..testmodels.synth import GEOMETRIES, write_checkpoint
    from ..testmodels.trained import RECIPES

    if geometry in RECIPES:
        _copy_trained(geometry, output)
        return
    if geometry not in GEOMETRIES:
        _usage(f"unknown geometry {geometry!r}; choose one of {', '.join([*GEOMETRIES, *RECIPES])}")
    if dtype not in ("float32", "bfloat16"):
        _usage(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    write_checkpoint(geometry, output, seed=seed, dtype=dtype)
    typer.echo(f"wrote random-weight {geometry} checkpoint to {output}")


def _copy_trained(name: str, output: Path) -> None:
    """`synth shapes-*`: the cached trained checkpoint (trained first if needed), copied to `output`."""
    import shutil

    from ..testmodels.trained import trained_checkpoint
    from .models import cache_root

    if output.exists() and not output.is_dir():
        _usage(f"-o {output} is a file, not a folder")
    checkpoint = trained_checkpoint(name, cache_root() / "trained", progress=_err)
    try:
        shutil.copytree(checkpoint, output, dirs_exist_ok=True)
    except OSError as exc:
        _usage(f"cannot write {output} ({exc.strerror or exc})")
    typer.echo(f"wrote trained {name} checkpoint to {output} (from {checkpoint})")


@app.command(name="eval")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(metavar="FOLDER", help=(
        "An exported model folder: of a model trained on the scenes (synth shapes-pg1, then export), or any "
        "with --reference."))],
    images: Annotated[list[str] | None, typer.Argument(metavar="[INPUT...]", show_default=False, help=(
        "With --reference: image files, folders or quoted globs to compare on (default the packaged sample "
        "images and 8 held-out scenes)."))] = None,
    reference: Annotated[Path | None, typer.Option(metavar="FOLDER", help=(
        "Compare FOLDER with this export of the same checkpoint (its fp32 or fp16 folder, say) on INPUT... "
        "instead of scoring scenes: same captions, tokens, teacher-forced next token and logit cosine."))] = None,
    scenes: Annotated[int, typer.Option(min=1, metavar="N", help="Held-out scenes to caption.")] = 200,
    seed: Annotated[int, typer.Option(min=0, metavar="N", help=(
        "Which held-out scenes (the evaluation stream of this seed; training never sees them)."))] = 0,
    prompt: Annotated[str, typer.Option(metavar="TEXT", help=(
        "caption en (tags, then the description) or tags en; with --reference any prompt."))] = "caption en",
    max_new_tokens: Annotated[int, typer.Option(min=1, metavar="N", help=(
        "With --reference: the longest caption compared."))] = 64,
    batch_size: Annotated[int | None, typer.Option(min=1, metavar="N", help=(
        f"Images captioned together (default {DEFAULT_CUDA_BATCH_SIZE} on CUDA, {DEFAULT_BATCH_SIZE} on the CPU)."),
        show_default=False)] = None,
    device: DeviceOpt = "auto",
    json_file: Annotated[Path | None, typer.Option("--json", metavar="FILE", help=(
        "Also write the scores and every caption (with its truth or the reference's) as JSON here."))] = None,
) -> None:
    """Score a model on held-out procedural scenes (exact match, token accuracy, per-attribute accuracy), or
    with --reference compare it with another export of the same checkpoint on your own images.

    The scenes are those the shapes-pg1 / shapes-pg2 checkpoints are trained on (`palionnx synth shapes-pg1`),
    drawn from a stream training never sees; captions are greedy, through the normal runtime. With
    --reference (any model: what int4 costs on your fine-tune), the folder's greedy captions are compared
    with the reference's, and both are fed the reference's tokens to compare their next tokens and logits;
    the images where the folder strays furthest are named.

    Examples: palionnx eval models/shapes-pg1-int4 --scenes 200 --json eval.json
              palionnx eval models/ft-int4 my-photos/ --reference models/ft-fp32
    """
    import json

    from ..jobs.checks import CheckError
    from .eval import check_eval, print_report

    try:
        check_eval(prompt if reference is None else None, json_file)
        if images and reference is None:
            raise CheckError("images to compare on are for --reference (the scenes bring their own)")
    except CheckError as exc:
        _usage(str(exc))
    if reference is not None:
        _evaluate_against(model_dir, reference, images or [], prompt, max_new_tokens, batch_size, device, json_file)
        return
    from ..testmodels.evaluation import evaluate as run_eval

    captioner = _load_folder(model_dir, device)
    _err(f"captioning {scenes} held-out scenes (seed {seed}, {prompt!r}) with {model_dir} "
         f"({captioner.manifest.quant.level}) on {captioner.providers[0]}")
    report = run_eval(captioner, count=scenes, seed=seed, prompt=prompt, batch_size=batch_size)
    print_report(report)
    if json_file:
        json_file.write_text(json.dumps(report.to_json(), indent=2) + "\n")


def _evaluate_against(model_dir: Path, reference: Path, inputs: list[str], prompt: str, max_new_tokens: int,
                      batch_size: int | None, device: str, json_file: Path | None) -> None:
    """`eval --reference`: the folder against the reference folder's captions and logits."""
    import json

    from ..agreement import agreement, reference_run
    from ..jobs.checks import CheckError
    from ..runtime.limits import RequestError
    from ..runtime.manifest import Manifest, ModelFolderError
    from .eval import check_same_checkpoint, print_agreement, reference_images

    try:
        check_same_checkpoint(Manifest.load(model_dir), Manifest.load(reference), model_dir, reference)
    except (ModelFolderError, CheckError) as exc:  # before any captioning
        _usage(str(exc))
    ref = _load_folder(reference, device)
    try:
        images = reference_images(inputs, ref.image_spec)
        _err(f"captioning {len(images)} images with the reference {reference} ({ref.manifest.quant.level})")
        run = reference_run(ref, images, prompt, max_new_tokens, batch_size)
    except (CheckError, RequestError) as exc:
        _usage(str(exc))
    except ValueError as exc:  # an image that cannot be read
        _usage(f"cannot compare on {exc}")
    del ref
    captioner = _load_folder(model_dir, device)
    _err(f"comparing {model_dir} ({captioner.manifest.quant.level}) with the reference")
    report = agreement(captioner, run, batch_size)
    print_agreement(report)
    if json_file:
        json_file.write_text(json.dumps(report.to_json(), indent=2) + "\n")


@app.command()
def demo(
    folder: Annotated[Path, typer.Option(metavar="FOLDER", help=(
        "Where the scenes are drawn and captioned (a .txt beside each image)."))] = Path("palionnx-demo"),
    scenes: Annotated[int, typer.Option(min=1, max=100, metavar="N", help="Scenes to draw and caption.")] = 6,
    family: Annotated[str, typer.Option(metavar="FAMILY", help=(
        "pg1 (Gemma decoder) or pg2 (Gemma 2 decoder)."))] = "pg1",
    quant: Annotated[str, typer.Option(metavar="LEVEL", help=(
        "Level of the exported model: fp32, int8 or int4 (MatMulNBits, block 32)."))] = "fp32",
    seed: Annotated[int, typer.Option(min=0, metavar="N", help="Which held-out scenes.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """See palionnx work offline: a small PaliGemma trained here on procedural scenes captions a few of them,
    and each caption is printed beside its truth.

    The first run trains the model (minutes on the CPU; needs palionnx[export]) and exports it into the cache
    (~/.cache/palionnx or $PALIONNX_CACHE); later runs reuse the export and need neither torch nor a network.
    The scenes are written to --folder and captioned by the same path as `palionnx caption`.

    Example: palionnx demo --folder demo/ --scenes 8
    """
    from .demo import DEMO_LEVELS, DemoError, demo_model, run_demo

    _check_device(device)  # before any training or export
    if family not in ("pg1", "pg2"):
        _usage(f"--family must be pg1 or pg2, got {family!r}")
    if quant not in DEMO_LEVELS:
        _usage(f"--quant must be one of {', '.join(DEMO_LEVELS)} (the CPU levels), got {quant!r}")
    if folder.exists() and not folder.is_dir():
        _usage(f"--folder {folder} is a file, not a folder")
    try:
        model_dir = demo_model(family, quant, say=_err)
        captioner = _load_folder(model_dir, device)
        _err(f"captioning {scenes} scenes in {folder} with {model_dir} ({quant}) on {captioner.providers[0]}")
        run_demo(captioner, folder, scenes, seed)
    except DemoError as exc:
        _usage(str(exc))
    _err(f"more: palionnx eval {model_dir} --scenes 200")


def _load_folder(model_dir: Path, device: str) -> Captioner:
    """Open an exported folder; a missing or damaged folder or a device that does not start is exit 2."""
    from ..runtime.manifest import ModelFolderError
    from ..runtime.sessions import DeviceError

    _check_device(device)
    try:
        return Captioner.load(model_dir, device=device)
    except (ModelFolderError, DeviceError) as exc:
        _usage(str(exc))


@app.command()
def info(
    model_dir: Annotated[Path, typer.Argument(metavar="FOLDER", help="An exported model folder.")],
    verify: Annotated[bool, typer.Option("--verify", help=(
        "Also check every file's SHA-256 against the manifest (reads the whole folder).")) ] = False,
) -> None:
    """Show a model folder's manifest, files, quant level and this machine's execution providers.

    Loading checks every file's size; --verify checks their contents. Exit status 2 when the folder is
    damaged.

    Example: palionnx info models/longprompt-int4 --verify
    """
    from ..runtime.manifest import Manifest, ModelFolderError
    from .info import info_rows, verify_rows
    from .tables import print_pairs

    try:
        manifest = Manifest.load(model_dir)
    except ModelFolderError as exc:
        _usage(str(exc))
    rows = info_rows(model_dir, manifest)
    if verify:
        checked, problems = verify_rows(model_dir, manifest)
        rows += checked
        print_pairs(rows)
        if problems:
            _usage(f"{model_dir} is damaged: {problems[0]}; copy, download or export it again")
        return
    print_pairs(rows)


@app.command()
def bench(
    model_dirs: Annotated[list[Path], typer.Argument(metavar="FOLDER...", help=(
        "Exported model folders, e.g. one per quant level."))],
    images: Annotated[int, typer.Option(min=1, metavar="N", help="Synthetic images per run.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=2, metavar="N", help=(
        "Tokens generated per image (eos ignored).")) ] = 32,
    batch_size: Annotated[int, typer.Option(min=1, metavar="N", help="Images per batch.")] = 1,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, directml or coreml.")] = "auto",
    repeats: Annotated[int, typer.Option(min=1, metavar="N", help=(
        "Timed runs after the warm-up; the median is reported.")) ] = 3,
    json_file: Annotated[Path | None, typer.Option("--json", metavar="FILE", help=(
        "Also write the rows as JSON here.")) ] = None,
    reference: Annotated[Path | None, typer.Option(metavar="FOLDER", help=(
        "Also compare each folder with this export of the same checkpoint (fp32, say) on the sample images: "
        "same captions, teacher-forced next token and logit cosine (see `palionnx eval --reference`)."))] = None,
) -> None:
    """Latency per model folder: load, vision, prefill, decode per token, throughput, memory, size.

    Each folder runs in its own process with a fixed generated length; a warm-up run is excluded. Every
    folder is checked first: a broken one is one line and exit status 2, before any measurement. With
    --reference, each folder's agreement with the reference stands beside its speed.

    Example: palionnx bench models/pg1-int8 models/pg1-int4 --max-new-tokens 64 --reference models/pg1-fp32
    """
    import json

    from ..runtime.measure import MeasureRefused, measure_in_subprocess
    from .bench import kernels, table_cells
    from .tables import print_table

    _check_device(device)
    _check_bench_folders(model_dirs, reference)
    rows = []
    for folder in model_dirs:
        _err(f"benchmarking {folder} ...")
        try:
            rows.append(measure_in_subprocess(folder, images=images, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, device=device, repeats=repeats))
        except MeasureRefused as exc:  # this folder cannot run on this device: the user's to change
            _err(f"error: {exc}")
            raise typer.Exit(2) from None
        except RuntimeError as exc:
            _err(f"error: {exc}")
            raise typer.Exit(1) from None
    if reference:
        _bench_agreement(rows, reference, device)
    print_table(*table_cells(rows))
    if kernels(rows):
        typer.echo(kernels(rows))
    if json_file:
        json_file.write_text(json.dumps(rows, indent=2) + "\n")


def _check_bench_folders(model_dirs: list[Path], reference: Path | None) -> None:
    """Every folder (and the reference) loads, and each is an export of the reference's checkpoint; else each
    problem is one line and exit status 2, before any measurement."""
    from ..jobs.checks import CheckError
    from ..runtime.manifest import Manifest, ModelFolderError
    from .eval import check_same_checkpoint

    broken = []
    for folder in model_dirs + ([reference] if reference else []):
        try:
            manifest = Manifest.load(folder)
            if reference and folder != reference:
                check_same_checkpoint(manifest, Manifest.load(reference), folder, reference)
        except (ModelFolderError, CheckError) as exc:
            broken.append(str(exc))
    for problem in broken:
        _err(f"error: {problem}")
    if broken:
        raise typer.Exit(2)


def _bench_agreement(rows: list[dict[str, Any]], reference: Path, device: str) -> None:
    """`bench --reference`: each row's agreement with the reference on the sample images (32 tokens)."""
    from ..agreement import agreement, reference_run
    from .eval import reference_images

    _err(f"comparing with {reference} ...")
    ref = _load_folder(reference, device)
    run = reference_run(ref, reference_images([], ref.image_spec), max_new_tokens=32)
    del ref
    for row in rows:
        summary = agreement(_load_folder(Path(row["model"]), device), run).summary()
        row.update(same_caption=summary["exact_match"], forced_agreement=summary["forced_agreement"],
                   forced_cosine=summary["forced_cosine"], reference=str(reference))


OverlapOpt = Annotated[bool, typer.Option("--overlap/--no-overlap", help=(
    "On the CPU, prefill newcomers beside the decode steps: tokens keep flowing while others join (about a fifth "
    "less throughput on 2 cores); --no-overlap prefills them inside the step."))]
ApiKeyOpt = Annotated[list[str] | None, typer.Option(
    "--api-key", metavar="KEY", envvar="PALIONNX_API_KEY", show_envvar=False, help=(
        "Require Authorization: Bearer KEY on every route but /healthz; repeat for several keys (or set "
        "PALIONNX_API_KEY)."), rich_help_panel="Access")]


def _tag_list(value: str) -> tuple[str, ...]:
    from ..jobs.checks import CheckError, tag_list

    try:
        return tag_list(value)
    except CheckError as exc:
        _usage(str(exc))


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(metavar="FOLDER", help="An exported model folder.")],
    host: Annotated[str, typer.Option(metavar="ADDRESS", help=(
        "Address to listen on (0.0.0.0 for every interface)."))] = SERVE.host,
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="N", help="Port to listen on.")] = SERVE.port,
    slots: Annotated[int | None, typer.Option(min=1, metavar="N", help=(
        f"Captions decoded together (default {DEFAULT_CUDA_BATCH_SIZE} on CUDA, {DEFAULT_SERVE_CPU_SLOTS} on the "
        "CPU)."), show_default=False)] = SERVE.slots,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, directml or coreml.")] = SERVE.device,
    max_queue: Annotated[int, typer.Option(min=1, metavar="N", help=(
        "Requests allowed to wait for a slot; more get 503."))] = SERVE.max_queue,
    timeout: Annotated[float, typer.Option(min=0.01, metavar="S", help=(
        "Seconds a request may take, waiting included; then 504."))] = SERVE.timeout_s,
    max_new_tokens: Annotated[int, typer.Option(min=1, metavar="N", help=(
        "Longest caption a request may ask for (and the default)."))] = SERVE.max_new_tokens,
    max_body_mb: Annotated[float, typer.Option(min=0.001, metavar="MB", help=(
        "Largest request body; bigger gets 413."))] = SERVE.max_body_mb,
    cuda_graph: CudaGraphOpt = SERVE.cuda_graph,
    overlap: OverlapOpt = SERVE.overlap,
    api_key: ApiKeyOpt = None,
    api_key_file: Annotated[Path | None, typer.Option(metavar="FILE", help=(
        "Keys, one per line (# comments), added to --api-key."), rich_help_panel="Access")] = None,
    metrics_public: Annotated[bool, typer.Option(help=(
        "Serve /metrics without a key (for a scraper on a trusted network)."),
        rich_help_panel="Access")] = SERVE.metrics_public,
    folder: Annotated[Path | None, typer.Option(metavar="DIR", rich_help_panel="Review page", help=(
        "Serve the review page of this dataset at /: its images and caption files, edit and save, recaption."
        ))] = SERVE.folder,
    ext: Annotated[str, typer.Option(metavar="EXT", rich_help_panel="Review page", help=(
        "The dataset's caption file extension, as caption --ext: .txt or .caption."))] = SERVE.ext,
    output_dir: Annotated[Path | None, typer.Option(metavar="FOLDER", rich_help_panel="Review page", help=(
        "The dataset's captions are here, mirroring DIR, as caption --output-dir."))] = SERVE.output_dir,
) -> None:
    """Serve captions over HTTP: a caption page at / (with --folder, a dataset's review page), POST
    /v1/caption, POST /v1/chat/completions (OpenAI-compatible; both stream with stream=true), GET /v1/models,
    GET /healthz, GET /metrics. Concurrent requests share decode steps. SIGTERM or Ctrl-C finish the requests
    in flight, then exit. Needs the serve extra: pip install 'palionnx[serve]'.

    Example: palionnx serve models/pg-int4 --port 8000 --slots 8 --api-key "$(cat key.txt)"
    """
    from ..runtime.manifest import ModelFolderError
    from ..runtime.sessions import DeviceError
    from ..server.auth import KeyFileError, read_key_file
    from ..server.options import ServeError, ServeExtraMissing, require_serve_extra

    try:
        require_serve_extra()
        from ..server.serve import serve as run_server

        keys = [*(api_key or []), *(read_key_file(api_key_file) if api_key_file else [])]
        if any(not key.strip() for key in keys):
            raise KeyFileError("--api-key cannot be empty")
        options = ServeOptions(host=host, port=port, slots=slots, device=device, max_queue=max_queue,
                               timeout_s=timeout, max_new_tokens=max_new_tokens, max_body_mb=max_body_mb,
                               cuda_graph=cuda_graph, overlap=overlap, api_keys=tuple(keys),
                               metrics_public=metrics_public, folder=folder, ext=ext, output_dir=output_dir)
        run_server(model_dir, options, say=_err)
    except (ServeExtraMissing, ServeError, ModelFolderError, DeviceError, KeyFileError) as exc:
        _usage(str(exc))


@app.command()
def doctor(
    device: Annotated[str, typer.Option(metavar="DEVICE", help=(
        "The device to check: auto, cpu, cuda, directml or coreml.")) ] = "auto",
) -> None:
    """Check this machine: what runs here, what fails and why, and what to use.

    Versions, onnxruntime flavour and providers, whether CUDA really starts (and the missing library if
    not), GPU, CPU features, RAM, caches, and the --quant / --batch-size that suit this machine.

    Exit status 1 when the requested --device cannot work here.

    Example: palionnx doctor --device cuda
    """
    from .doctor import diagnose
    from .tables import print_pairs

    _check_device(device)
    report = diagnose(device)
    print_pairs(report.rows)
    for problem in report.problems:
        _err(f"error: {problem}")
    raise typer.Exit(1 if report.problems else 0)


models_app = typer.Typer(cls=CleanGroup, rich_markup_mode="markdown", invoke_without_command=True, help=(
    "List or remove the cached models: exports made on first use and pre-exported hub downloads."))
app.add_typer(models_app, name="models")


@models_app.callback()
def models(ctx: typer.Context) -> None:
    """List the cached models: model, level, size, when made, where.

    Example: palionnx models
    """
    if ctx.invoked_subcommand is not None:
        return
    from .models import age, cache_root, cached_models
    from .tables import human_bytes, print_table

    found = cached_models()
    if not found:
        _err(f"no cached models (cache: {cache_root()})")
        return
    print_table(["model", "level", "size", "made", "from", "folder"],
                [[m.model, m.level, human_bytes(m.size), age(m.made), m.origin, str(m.folder)] for m in found])


@models_app.command("rm")
def models_rm(
    model: Annotated[str, typer.Argument(metavar="OWNER/NAME", help="The hub id the model was cached for.")],
    quant: Annotated[str | None, typer.Option(metavar="LEVEL", help=(
        "Remove only this level's export (default: every level, and the hub download)."), show_default=False)] = None,
) -> None:
    """Remove a cached model.

    Example: palionnx models rm mnemic/paligemma-longprompt-v1-safetensors --quant int8
    """
    from .models import remove_cached
    from .tables import human_bytes

    removed = remove_cached(model, quant)
    if not removed:
        _usage(f"nothing cached for {model}{f' at {quant}' if quant else ''} (see palionnx models)")
    for entry in removed:
        typer.echo(f"removed {entry.model} {entry.level} ({human_bytes(entry.size)}, {entry.origin}) {entry.folder}")


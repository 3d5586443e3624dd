"""The `palionnx` command: a thin typer layer over palionnx.export and palionnx.runtime."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Caption images with PaliGemma through ONNX Runtime. Export a checkpoint once, run it anywhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="palionnx")

"""`palionnx eval`: the checks before the model loads and the report of `palionnx.evaluation`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..evaluation import Report
from ..scenes import PROMPTS
from .checks import CheckError


def check_eval(prompt: str, json_file: Path | None) -> None:
    """A prompt the scenes have a truth for, and a --json path that can be written."""
    if prompt not in PROMPTS:
        raise CheckError(f"--prompt must be one of {', '.join(PROMPTS)} (the prompts the scenes have a truth for), "
                         f"got {prompt!r}")
    if json_file is not None and (json_file.is_dir() or not json_file.parent.is_dir()):
        raise CheckError(f"--json {json_file}: give a file path in an existing folder")


def print_report(report: Report) -> None:
    """Exact match, token accuracy and each attribute's accuracy, one per line."""
    typer.echo(f"exact match     {report.exact_match:.1%}")
    typer.echo(f"token accuracy  {report.token_accuracy:.1%}")
    for name, value in report.attribute_accuracy().items():
        typer.echo(f"{name:15s} {value:.1%}")

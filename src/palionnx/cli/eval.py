"""`palionnx eval`: the checks before the model loads, the report of `palionnx.testmodels.evaluation` (held-out scenes)
and, with --reference, of `palionnx.agreement` (the folder against a reference folder, on any images)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..agreement import Agreement
from ..jobs.checks import CheckError
from ..jobs.files import find_images
from ..runtime.manifest import Manifest
from ..runtime.preprocess import ImageInput, ImageSpec, Pixels, image_pixels
from ..samples import sample_images
from ..testmodels.evaluation import Report
from ..testmodels.scenes import PROMPTS, make_scenes, render

DEFAULT_SCENES = 8  # --reference without IMAGES: the packaged samples and this many held-out scenes


def check_eval(prompt: str | None, json_file: Path | None) -> None:
    """A prompt the scenes have a truth for (None: any prompt), and a --json path that can be written."""
    if prompt is not None and prompt not in PROMPTS:
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


def check_same_checkpoint(folder: Manifest, reference: Manifest, folder_path: Path, reference_path: Path) -> None:
    """Two exports comparable token for token: the same family, vocabulary, image size and prompt layout."""
    for name in ("family", "vocab_size", "image_size", "image_seq_length", "prompt_template", "hidden", "layers"):
        if getattr(folder, name) != getattr(reference, name):
            raise CheckError(f"{folder_path} and {reference_path} are not exports of one checkpoint "
                             f"({name} {getattr(folder, name)!r} against {getattr(reference, name)!r})")


def reference_images(inputs: list[str], spec: ImageSpec) -> list[ImageInput]:
    """The images a --reference comparison runs on: the files, folders and globs given, or the packaged
    sample images and DEFAULT_SCENES held-out scenes (named "sample N", "scene N")."""
    if inputs:
        try:
            jobs = find_images(inputs)
        except FileNotFoundError as exc:
            raise CheckError(str(exc)) from None
        if not jobs:
            raise CheckError(f"no images in {', '.join(inputs)}")
        return [job.image for job in jobs]
    images = [(f"sample {i}", image) for i, image in enumerate(sample_images(4, spec.size))]
    images += [(f"scene {i}", render(scene, spec.size)) for i, scene in enumerate(make_scenes(DEFAULT_SCENES))]
    return [Pixels(image_pixels(image, spec), name) for name, image in images]


def print_agreement(report: Agreement, worst: int = 3) -> None:
    """The folder against its reference: the means, then the images where it strays furthest."""
    s = report.summary()
    typer.echo(f"{report.folder} against {report.reference} ({s['images']} images, {report.prompt!r}):")
    typer.echo(f"  same caption           {s['exact_match']:.1%}")
    typer.echo(f"  tokens in agreement    {s['token_agreement']:.1%}")
    typer.echo(f"  next token (forced)    {s['forced_agreement']:.2%}")
    typer.echo(f"  logit cosine (forced)  {s['forced_cosine']:.5f}")
    for image in report.worst(worst):
        typer.echo(f"  worst: {image.source}: cosine {image.forced_cosine:.5f}, next token {image.forced_agreement:.1%}"
                   + ("" if image.same_caption else f"; {image.caption[:60]!r} vs {image.reference_caption[:60]!r}"))

"""`palionnx demo`: a small PaliGemma trained here on procedural scenes, exported once into the cache, captions
a few scenes through the normal caption path; each caption is printed beside its truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from ..jobs.captioning import caption_files
from ..jobs.files import ImageJob
from ..jobs.options import CaptionOptions
from ..jobs.plan import plan_run
from ..runtime.captioner import Captioner
from ..runtime.contract import MANIFEST_NAME
from ..testmodels.evaluation import Report, score_scene, text_ids
from ..testmodels.scenes import CAPTION_PROMPT, Scene, make_scenes, render
from .eval import print_report
from .models import cache_root

DEMO_LEVELS = ("fp32", "int8", "int4")  # the CPU levels
DEMO_BLOCK_SIZE = 32  # int8/int4: MatMulNBits at this block (the model is too small to measure kernels on)


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


def demo_model(family: str, quant: str, say: Callable[[str], None]) -> Path:
    """The exported folder of the trained `shapes-FAMILY` at `quant` in the cache; on first use the checkpoint
    is trained (or taken from the cache) and exported, which needs torch."""
    from ..testmodels.trained import code_key

    name = f"shapes-{family}"
    folder = cache_root() / "models" / f"{name}-{code_key(name)}" / quant
    if (folder / MANIFEST_NAME).is_file():
        return folder
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise DemoError(f"the demo trains and exports its model once, which needs the export extra: pip install "
                        f"'palionnx[export]' (nothing cached yet in {cache_root()})") from None
    from ..export.convert import export
    from ..testmodels.trained import trained_checkpoint

    checkpoint = trained_checkpoint(name, cache_root() / "trained", progress=say)
    say(f"exporting {name} at {quant} into {folder} (first use only)")
    quantized = quant != "fp32"
    export(checkpoint, folder, quant=quant, device="cpu", block_size=DEMO_BLOCK_SIZE if quantized else None,
           kernels="nbits" if quantized else "auto")
    return folder


def write_scenes(scenes: list[Scene], folder: Path, size: int) -> list[ImageJob]:
    """Draw the scenes as scene-NNN.png in `folder` (made if needed); DemoError when it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(scenes):
            render(scene, size).save(folder / f"scene-{i:03d}.png")
    except OSError as exc:
        raise DemoError(f"cannot write the scenes into {folder} ({exc.strerror or exc})") from None
    return [ImageJob(folder / f"scene-{i:03d}.png", folder) for i in range(len(scenes))]


def run_demo(captioner: Captioner, folder: Path, count: int, seed: int) -> Report:
    """Caption `count` held-out scenes written into `folder` (a .txt beside each image) and print each caption
    beside its truth, then the scores."""
    scenes = make_scenes(count, seed)
    jobs = write_scenes(scenes, folder, captioner.manifest.image_size)
    options = CaptionOptions(existing="overwrite", prompt=CAPTION_PROMPT)
    caption_files(captioner, plan_run(jobs, options, quiet=True), options, quiet=True)
    tokenizer = captioner.text.tokenizer
    report = Report(folder=str(captioner.folder), prompt=CAPTION_PROMPT, seed=seed)
    for i, (scene, job) in enumerate(zip(scenes, jobs)):
        caption_file = job.image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8") if caption_file.is_file() else ""
        score = score_scene(i, scene, CAPTION_PROMPT, caption, text_ids(tokenizer, caption),
                            text_ids(tokenizer, scene.truth()))
        report.scenes.append(score)
        verdict = "exact" if score.exact else f"token accuracy {score.token_accuracy:.0%}"
        typer.echo(f"\n{job.image.name}  {verdict}\n  caption: {caption}\n  truth:   {scene.truth()}")
    exact = sum(s.exact for s in report.scenes)
    typer.echo(f"\n{exact} of {count} captions exactly right")
    print_report(report)
    return report

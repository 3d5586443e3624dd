"""Quality per quant level on the trained test models: what each level costs in right captions.

    python benchmarks/trained_quality.py                        # shapes-pg1 and shapes-pg2, 200 scenes, CPU
    python benchmarks/trained_quality.py --families pg1 --scenes 50 --levels fp32 int4:128

For each family (`shapes-pg1`, `shapes-pg2`, trained on first use into the palionnx cache) every level is
exported afresh and captions the same held-out scenes with `caption en`, greedy, through `Captioner.caption`
(`palionnx eval`'s numbers: exact match, token accuracy, per-attribute accuracy). Second column group:
teacher-forced along fp32's captions (and their eos), the share of positions whose next token equals fp32's
and the mean cosine of the logits with fp32's. Paired with fp32 scene by scene: the scenes a level gets wrong
that fp32 gets right (lost) and the reverse (won), with McNemar's exact p-value.

Levels: fp32, fp16 (built for CUDA, run here on the CPU), LEVEL:BLOCK for int8/int4 on MatMulNBits at that
block size (int4:128), LEVEL:auto for the block size and kernels the export measures on this CPU, and
LEVEL:qgemm for int8 QGEMM (dynamically quantized activations) in the vision encoder and prefill.
Writes benchmarks/results/trained-quality-cpu.{json,md} (--name to change).

On a GPU: `--device cuda --levels fp32 fp16 bf16 int8:cuda int4:cuda` runs every level but fp32 (the CPU
reference) on CUDA (LEVEL:cuda: int8/int4 built for CUDA, block 32). `--checkpoints DIR` takes the trained
checkpoints from DIR/shapes-pg1 and DIR/shapes-pg2 instead of the cache (a machine with other torch or
transformers versions would otherwise train its own); `--work DIR --export-only` exports every level there
first, and a later run with the same `--work` reuses those folders.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from palionnx import Captioner
from palionnx.evaluation import evaluate
from palionnx.runtime.preprocess import image_pixels
from palionnx.scenes import CAPTION_PROMPT, make_scenes, render

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = ["fp32", "fp16", "int8:32", "int8:64", "int8:128", "int4:32", "int4:64", "int4:128", "int4:auto",
          "int8:qgemm", "int4:qgemm"]


def forced_logits(captioner: Captioner, images: list, tokens: list[list[int]]) -> list[np.ndarray]:
    """Per image, the logits [positions, vocab] along `tokens`: each position is fed the given token, whatever
    the model would have picked."""
    out = []
    for image, forced in zip(images, tokens):
        batch = captioner.prompt_batch(image_pixels(image, captioner.image_spec)[None], [CAPTION_PROMPT])
        state = captioner.model.new_state(1, batch.input_ids.shape[1] + len(forced))
        output = state.prefill(batch)
        rows = []
        for position, token in enumerate(forced):
            rows.append(output.logits()[0].astype(np.float32))
            if position + 1 < len(forced):
                output = state.step(np.array([token], dtype=np.int64))
        out.append(np.stack(rows))
    return out


def paired_vs_reference(reference: list[bool], other: list[bool]) -> dict[str, float]:
    """Exact match scene by scene against the reference (fp32): scenes lost (right at fp32, wrong here) and won,
    and McNemar's exact two-sided p-value (a binomial test on the discordant scenes): below 0.05, the
    difference is more than the luck of which scenes were drawn."""
    lost = sum(r and not o for r, o in zip(reference, other))
    won = sum(o and not r for r, o in zip(reference, other))
    n = lost + won
    p_value = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(lost, won) + 1)) / 2**n) if n else 1.0
    return {"lost": lost, "won": won, "p_value": p_value}


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """(share of positions with the same argmax, mean logit cosine) over all positions of all images."""
    a, b = np.concatenate(reference), np.concatenate(other)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return float((a.argmax(-1) == b.argmax(-1)).mean()), float(cosine.mean())


def export_level(checkpoint: Path, level: str, folder: Path) -> None:
    """Export `checkpoint` at `level` (fp32, fp16, bf16, int8:BLOCK, int4:BLOCK, int8:auto, int4:auto,
    int8:qgemm, int4:qgemm, int8:cuda, int4:cuda) unless `folder` holds that export already."""
    from palionnx.export.convert import export
    from palionnx.runtime.contract import MANIFEST_NAME

    if (folder / MANIFEST_NAME).exists():  # exported by an earlier --export-only run
        return
    quant, _, block = level.partition(":")
    if quant in ("fp32", "fp16", "bf16"):
        export(checkpoint, folder, quant=quant, device="auto")
    elif block == "cuda":
        export(checkpoint, folder, quant=quant, device="cuda")
    elif block == "auto":
        export(checkpoint, folder, quant=quant, device="cpu")
    elif block == "qgemm":  # int8 QGEMM for the vision encoder and prefill, decode at the measured block
        export(checkpoint, folder, quant=quant, device="cpu", kernels="qgemm")
    else:
        export(checkpoint, folder, quant=quant, device="cpu", block_size=int(block), kernels="nbits")


def checkpoint_of(family: str, args: argparse.Namespace) -> Path:
    from palionnx.cli.models import cache_root
    from palionnx.export.trained import trained_checkpoint

    if args.checkpoints:
        return args.checkpoints / f"shapes-{family}"
    return trained_checkpoint(f"shapes-{family}", cache_root() / "trained", progress=print)


def level_folder(work: Path, family: str, level: str) -> Path:
    return work / f"shapes-{family}-{level.replace(':', '-')}"


def measure_family(family: str, args: argparse.Namespace, work: Path) -> list[dict]:
    checkpoint = checkpoint_of(family, args)
    rows: list[dict] = []
    reference: tuple[list[list[int]], list[np.ndarray]] | None = None
    reference_exact: list[bool] = []
    for level in args.levels:
        folder = level_folder(work, family, level)
        export_level(checkpoint, level, folder)
        captioner = Captioner.load(folder, device="cpu" if level == "fp32" else args.device)
        report = evaluate(captioner, count=args.scenes, seed=args.seed, prompt=CAPTION_PROMPT, batch_size=16)
        exact = [scene.exact for scene in report.scenes]
        reference_exact = reference_exact or exact
        images = [render(scene, captioner.manifest.image_size) for scene in make_scenes(args.forced, args.seed)]
        if reference is None:  # fp32 comes first: its captions and logits are the reference
            eos = captioner.manifest.eos_token_ids[0]
            tokens = [s.tokens + [eos] for s in captioner.caption(images, prompt=CAPTION_PROMPT, batch_size=16,
                                                                  max_new_tokens=args.max_new_tokens)]
            reference = (tokens, forced_logits(captioner, images, tokens))
        same, cosine = agreement(reference[1], forced_logits(captioner, images, reference[0]))
        quant = captioner.manifest.quant
        kernels = quant.cpu_kernels
        rows.append({"family": family, "level": level, "block_size": quant.block_size,
                     "kernels": f"{kernels.vision} / {kernels.prefill} / {kernels.decode}" if kernels else None,
                     **report.summary(), "paired_vs_fp32": paired_vs_reference(reference_exact, exact),
                     "forced_next_token_agreement": same, "forced_logit_cosine": cosine})
        print({k: v for k, v in rows[-1].items() if k != "folder"}, flush=True)
        if not args.work:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def gpu_name() -> str:
    import subprocess

    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip() or "CUDA"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    where = (f"on {args.device_name} (fp32 on the CPU)" if args.device == "cuda"
             else f"on the CPU ({platform.processor() or platform.machine()})")
    lines = [f"Trained test models, {args.scenes} held-out scenes (seed {args.seed}), `caption en`, greedy, "
             f"{where}; teacher-forced columns over {args.forced} "
             "scenes along fp32's captions. int LEVEL:BLOCK is MatMulNBits at that block; :auto is the export's "
             "measured choice (block, kernels vision / prefill / decode in brackets).", "",
             "| family | level | exact match | scenes lost / won vs fp32 (p) | token accuracy | kind | colour | count "
             "| position | size | background | next token = fp32 (forced) | logit cosine vs fp32 (forced) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        a = r["attributes"]
        level = r["level"]
        if level.endswith((":auto", ":qgemm")):
            level += f" (block {r['block_size']}, {r['kernels']})"
        paired = r["paired_vs_fp32"]
        cells = [r["family"], level, f"{r['exact_match']:.1%}",
                 f"{paired['lost']} / {paired['won']} ({paired['p_value']:.2g})", f"{r['token_accuracy']:.1%}",
                 *(f"{a[name]:.1%}" for name in ("kind", "colour", "count", "position", "size", "background")),
                 f"{r['forced_next_token_agreement']:.2%}", f"{r['forced_logit_cosine']:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["pg1", "pg2"], choices=["pg1", "pg2"])
    parser.add_argument("--levels", nargs="+", default=LEVELS)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--forced", type=int, default=50, help="scenes for the teacher-forced columns")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="fp32's reference captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file name without extension (default trained-quality-DEVICE)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every level but fp32 runs")
    parser.add_argument("--checkpoints", type=Path, help="a folder with shapes-pg1/ and shapes-pg2/ checkpoints")
    parser.add_argument("--work", type=Path, help="export the levels here and keep them (default: a temp dir)")
    parser.add_argument("--export-only", action="store_true", help="with --work: export every level, then stop")
    args = parser.parse_args()
    if args.levels[0] != "fp32":
        parser.error("the first level must be fp32 (the reference)")
    if args.export_only and not args.work:
        parser.error("--export-only needs --work")
    args.name = args.name or f"trained-quality-{args.device}"
    if args.export_only:
        for family in args.families:
            for level in args.levels:
                export_level(checkpoint_of(family, args), level, level_folder(args.work, family, level))
        return
    args.device_name = gpu_name() if args.device == "cuda" else "CPU"

    work = args.work or Path(tempfile.mkdtemp(prefix="palionnx-quality-"))
    try:
        rows = [row for family in args.families for row in measure_family(family, args, work)]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    report = {"args": vars(args), "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()

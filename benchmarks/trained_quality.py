"""Quality per quant level on the trained test models: what each level costs in right captions.

    python benchmarks/trained_quality.py                        # shapes-pg1 and shapes-pg2, 200 scenes, CPU
    python benchmarks/trained_quality.py --families pg1 --scenes 50 --levels fp32 int4:128

For each family (`shapes-pg1`, `shapes-pg2`, trained on first use into the palionnx cache) every level is
exported afresh and captions the same held-out scenes with `caption en`, greedy, through `Captioner.caption`
(`palionnx eval`'s numbers: exact match, token accuracy, per-attribute accuracy), paired with fp32 scene by
scene: the scenes a level gets wrong that fp32 gets right (lost) and the reverse (won), with McNemar's exact
p-value. Teacher-forced (over --forced scenes): the truth's likelihood (mean negative log-likelihood per
token of the truth caption and its eos, and its paired difference from fp32's with a 95 % interval), and
along fp32's own captions the share of positions whose next token equals fp32's and the mean cosine of the
logits with fp32's. `--edge` takes the scenes at the edges of the training jitter instead (the hardest set
still inside what training saw).

Levels: fp32, fp16 (built for CUDA, run here on the CPU), LEVEL:BLOCK for int8/int4 on MatMulNBits at that
block size (int4:128), LEVEL:auto for what `palionnx export` does by default (these decoders are too small
to time: MatMulNBits at block 32), LEVEL:measured for the kernels it times and chooses as it would for a 3B
model (`--measure-kernels`), and LEVEL:qgemm for int8 QGEMM (activations quantized per row at run time) in
the vision encoder and prefill. Every int8/int4 level but LEVEL:BLOCK calibrates its int8 activations at
export (export/linear.py). `--stress a512c8 ...` runs each level on function-preserving outlier variants of
the models as well (testmodels/stress.py: `none` is the model as trained); `--forced 0` skips the
teacher-forced columns. Writes benchmarks/results/trained-quality-cpu.{json,md} (--name to change).

On a GPU: `--device cuda --levels fp32 fp16 bf16 int8:cuda int4:cuda` runs every level but fp32 (the CPU
reference) on CUDA (LEVEL:cuda: int8/int4 built for CUDA at its default blocks, 32 and 128).
`--checkpoints DIR` takes the trained checkpoints from DIR/shapes-pg1 and DIR/shapes-pg2 instead of the
cache (a machine with other torch or transformers versions would otherwise train its own); `--work DIR
--export-only` exports every level there first, and a later run with the same `--work` reuses those folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from palionnx import Captioner
from palionnx.agreement import forced_logits
from palionnx.runtime.measure import device_name
from palionnx.testmodels.evaluation import evaluate, text_ids
from palionnx.testmodels.scenes import CAPTION_PROMPT, Scene, Shape, make_scenes, render

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = ["fp32", "fp16", "int8:32", "int8:64", "int8:128", "int4:32", "int4:64", "int4:128", "int4:auto",
          "int8:qgemm", "int4:qgemm"]


def truth_nll(logits: list[np.ndarray], truths: list[list[int]]) -> np.ndarray:
    """Per scene, the mean negative log-likelihood (nats per token) of its truth caption and eos, from the
    logits teacher-forced along that truth: lower is better, and unlike exact match it moves with every
    perturbation of the model."""
    nll = []
    for scores, truth in zip(logits, truths):
        scores = scores.astype(np.float64)
        top = scores.max(-1)
        log_z = top + np.log(np.exp(scores - top[:, None]).sum(-1))
        nll.append(float(np.mean(log_z - scores[np.arange(len(truth)), truth])))
    return np.array(nll)


def paired_difference(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean of other - reference over the same scenes, with its 95 % confidence half-width (normal)."""
    diff = other - reference
    half = 1.96 * float(diff.std(ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {"mean": float(diff.mean()), "ci95": half}


def at_the_edges(scene: Scene) -> Scene:
    """The scene with every jitter at the end of its training range that makes it hardest: small shapes at
    their largest and large ones at their smallest (the sizes closest to each other), the strongest colour
    tint, the largest offset from the cell's centre. Still inside what training saw."""
    def edge(shape: Shape) -> Shape:
        r, g, b = (20 if t >= 0 else -20 for t in shape.tint)
        return dataclasses.replace(shape, scale=1.12 if shape.size == "small" else 0.88, tint=(r, g, b),
                                   dx=0.04 if shape.dx >= 0 else -0.04, dy=0.04 if shape.dy >= 0 else -0.04)

    return dataclasses.replace(scene, shapes=tuple(edge(shape) for shape in scene.shapes))


def held_out(count: int, args: argparse.Namespace) -> list[Scene]:
    """The evaluation stream's first `count` scenes for the seed; with --edge, pushed to the edges."""
    scenes = make_scenes(count, args.seed)
    return [at_the_edges(scene) for scene in scenes] if args.edge else scenes


def paired_vs_reference(reference: list[bool], other: list[bool]) -> dict[str, float]:
    """Exact match scene by scene against the reference (fp32): scenes lost (right at fp32, wrong here) and won,
    and McNemar's exact two-sided p-value (a binomial test on the discordant scenes): below 0.05, the
    difference is more than the luck of which scenes were drawn."""
    lost = sum(r and not o for r, o in zip(reference, other))
    won = sum(o and not r for r, o in zip(reference, other))
    return {"lost": lost, "won": won, "p_value": mcnemar_p(lost, won)}


def mcnemar_p(lost: int, won: int) -> float:
    """McNemar's exact two-sided p-value: how likely a split at least this uneven is when a scene is as
    likely to be lost as won."""
    n = lost + won
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(lost, won) + 1)) / 2**n) if n else 1.0


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
    elif block == "measured":  # timed and chosen as for a big decoder
        export(checkpoint, folder, quant=quant, device="cpu", always_measure=True)
    elif block == "qgemm":  # int8 QGEMM for the vision encoder and prefill, decode at the measured block
        export(checkpoint, folder, quant=quant, device="cpu", kernels="qgemm")
    else:
        export(checkpoint, folder, quant=quant, device="cpu", block_size=int(block), kernels="nbits")


def checkpoint_of(family: str, args: argparse.Namespace, stress: str = "none", work: Path | None = None) -> Path:
    """The trained checkpoint of `family`, or its `stress` variant (written under `work` on first use)."""
    from palionnx.cli.models import cache_root
    from palionnx.export.calibrate import spiky_channels
    from palionnx.testmodels.stress import Stress, stress_checkpoint
    from palionnx.testmodels.trained import trained_checkpoint

    if args.checkpoints:
        base = args.checkpoints / f"shapes-{family}"
    else:
        base = trained_checkpoint(f"shapes-{family}", cache_root() / "trained", progress=print)
    if stress == "none":
        return base
    assert work is not None
    folder = work / f"checkpoint-shapes-{family}-{stress}"
    if not (folder / "config.json").is_file():
        stress_checkpoint(base, folder, Stress.parse(stress), spiky_channels)
    return folder


def level_folder(work: Path, family: str, level: str, stress: str = "none") -> Path:
    return work / f"shapes-{family}{'' if stress == 'none' else '-' + stress}-{level.replace(':', '-')}"


def measure_family(family: str, args: argparse.Namespace, work: Path) -> list[dict]:
    return [row for stress in args.stress for row in measure_variant(family, stress, args, work)]


def measure_variant(family: str, stress: str, args: argparse.Namespace, work: Path) -> list[dict]:
    checkpoint = checkpoint_of(family, args, stress, work)
    rows: list[dict] = []
    reference: tuple[list[list[int]], list[np.ndarray]] | None = None
    reference_exact: list[bool] = []
    reference_nll: np.ndarray | None = None
    for level in args.levels:
        folder = level_folder(work, family, level, stress)
        export_level(checkpoint, level, folder)
        captioner = Captioner.load(folder, device="cpu" if level == "fp32" else args.device)
        report = evaluate(captioner, prompt=CAPTION_PROMPT, batch_size=16, seed=args.seed,
                          scenes=held_out(args.scenes, args))
        exact = [scene.exact for scene in report.scenes]
        reference_exact = reference_exact or exact
        quant = captioner.manifest.quant
        kernels = quant.cpu_kernels
        split = sum(kernels.site_counts(role)["split"] for role in kernels.sites) if kernels else 0
        rows.append({"family": family, "stress": stress, "level": level, "block_size": quant.block_size,
                     "kernels": f"{kernels.vision} / {kernels.prefill} / {kernels.decode}" if kernels else None,
                     "inputs_split": split, **report.summary(),
                     "paired_vs_fp32": paired_vs_reference(reference_exact, exact)})
        if args.forced:
            scenes = held_out(args.forced, args)
            images = [render(scene, captioner.manifest.image_size) for scene in scenes]
            eos = captioner.manifest.eos_token_ids[0]
            truths = [text_ids(captioner.text.tokenizer, scene.truth(CAPTION_PROMPT)) + [eos] for scene in scenes]
            nll = truth_nll(forced_logits(captioner, images, truths, CAPTION_PROMPT, 16), truths)
            if reference is None:  # fp32 comes first: its captions, logits and likelihoods are the reference
                tokens = [s.tokens + [eos] for s in captioner.caption(images, prompt=CAPTION_PROMPT, batch_size=16,
                                                                      max_new_tokens=args.max_new_tokens)]
                reference = (tokens, forced_logits(captioner, images, tokens, CAPTION_PROMPT, 16))
                reference_nll = nll
            assert reference_nll is not None
            same, cosine = agreement(reference[1], forced_logits(captioner, images, reference[0], CAPTION_PROMPT, 16))
            rows[-1].update({"truth_nll": float(nll.mean()), "truth_nll_vs_fp32": paired_difference(reference_nll, nll),
                             "forced_next_token_agreement": same, "forced_logit_cosine": cosine})
        print({k: v for k, v in rows[-1].items() if k != "folder"}, flush=True)
        if not args.work:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    where = (f"on {args.device_name} (fp32 on the CPU)" if args.device == "cuda"
             else f"on the CPU ({args.device_name})")
    forced = bool(args.forced)
    lines = [f"Trained test models, {args.scenes} held-out scenes{' at the edges' if args.edge else ''} "
             f"(seed {args.seed}), `caption en`, greedy, "
             f"{where}. Stress: `none` is the model as trained, aALPHAcN its function-preserving outlier variant "
             "(testmodels/stress.py; -text: the decoder only; sN: N token-specific spike channels per layer), against "
             "whose own fp32 each level is paired. Lost / won: scenes wrong at this level and right at fp32, and the "
             "reverse (McNemar's exact p). Inputs split: linear-layer inputs with outlier channels split off at "
             "export (export/linear.py). int LEVEL:BLOCK is MatMulNBits at that block (no calibration); :auto "
             "the default export; :measured the kernels timed and chosen as for a 3B model; :qgemm int8 QGEMM "
             "for the vision encoder and prefill (block, kernels vision / prefill / decode in brackets)."
             + (f" Teacher-forced columns over the first {args.forced} scenes: the truth's NLL along the truth "
                "caption, next token and logit cosine along fp32's captions." if forced else ""), ""]
    titles = ["family", "stress", "level", "exact match", "− fp32", "scenes lost / won vs fp32 (p)", "inputs split",
              "token accuracy", "kind", "colour", "count", "position", "size", "background"]
    if forced:
        titles += ["truth NLL − fp32's (95 % CI)", "next token = fp32 (forced)", "logit cosine vs fp32 (forced)"]
    lines += ["| " + " | ".join(titles) + " |", "| --- | --- | --- |" + " ---: |" * (len(titles) - 3)]
    fp32 = {(r["family"], r["stress"]): r["exact_match"] for r in rows if r["level"] == "fp32"}
    for r in rows:
        a = r["attributes"]
        level = r["level"]
        if level.endswith((":auto", ":qgemm", ":measured")):
            level += f" (block {r['block_size']}, {r['kernels']})"
        paired = r["paired_vs_fp32"]
        base = fp32.get((r["family"], r["stress"]), r["exact_match"])
        cells = [r["family"], r["stress"], level, f"{r['exact_match']:.1%}", f"{100 * (r['exact_match'] - base):+.1f}",
                 f"{paired['lost']} / {paired['won']} ({paired['p_value']:.2g})", str(r["inputs_split"]),
                 f"{r['token_accuracy']:.1%}",
                 *(f"{a[name]:.1%}" for name in ("kind", "colour", "count", "position", "size", "background"))]
        if forced:
            cells += [f"{r['truth_nll_vs_fp32']['mean']:+.5f} ± {r['truth_nll_vs_fp32']['ci95']:.5f}",
                      f"{r['forced_next_token_agreement']:.2%}", f"{r['forced_logit_cosine']:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    families = sorted({r["family"] for r in rows})
    if len(families) > 1:  # the same level on both models: more scenes, one test
        lines += ["", f"Pooled over {' and '.join(families)}: scenes lost / won against fp32 (McNemar's exact p).", "",
                  "| stress | level | lost / won (p) |", "| --- | --- | ---: |"]
        for stress, level in dict.fromkeys((r["stress"], r["level"]) for r in rows if r["level"] != "fp32"):
            same = [r for r in rows if (r["stress"], r["level"]) == (stress, level)]
            lost = sum(r["paired_vs_fp32"]["lost"] for r in same)
            won = sum(r["paired_vs_fp32"]["won"] for r in same)
            lines.append(f"| {stress} | {level} | {lost} / {won} ({mcnemar_p(lost, won):.2g}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["pg1", "pg2"], choices=["pg1", "pg2"])
    parser.add_argument("--levels", nargs="+", default=LEVELS)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--forced", type=int, default=200, help="scenes for the teacher-forced columns (0: none)")
    parser.add_argument("--stress", nargs="+", default=["none"], help="outlier variants of each family, e.g. "
                        "none a128c4 a512c8 a512c8-text a512c0s2 (testmodels/stress.py)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="fp32's reference captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edge", action="store_true", help="the scenes at the edges of the training jitter "
                        "(sizes closest to each other, strongest tints): the hardest in-distribution set")
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
            for stress in args.stress:
                for level in args.levels:
                    export_level(checkpoint_of(family, args, stress, args.work), level,
                                 level_folder(args.work, family, level, stress))
        return
    args.device_name = device_name(args.device)

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

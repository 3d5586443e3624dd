"""Quality per quant level: teacher-forced next-token agreement with fp32 and mean logit cosine.

    python benchmarks/quality.py --geometry pg1-3b-224-l4 --images 8 --tokens 32
    python benchmarks/quality.py --geometry pg1-3b-224-l4 --stress a512c8 --levels int8 int4 int4:qgemm

fp32 generates greedily; every other level is compared with it by `palionnx.agreement` (what `palionnx eval
--reference` reports): same captions, and fed fp32's tokens (teacher forcing), its next token and logit
cosine at each position. Random weights are not a trained model: these numbers measure how much each level
perturbs the network, not caption quality. `--stress` gives the checkpoint function-preserving activation
outliers first (testmodels/stress.py), as trained language models have. Levels name their CPU kernels
(int4:qgemm:64: int8 QGEMM for the vision encoder and prefill, MatMulNBits int4 block 64 for decode).
Writes benchmarks/results/quality-GEOMETRY[-STRESS][-STEM].{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from palionnx import Captioner
from palionnx.agreement import agreement, reference_run
from palionnx.runtime.manifest import Manifest
from palionnx.samples import sample_images

RESULTS = Path(__file__).resolve().parent / "results"


def _parse_level(spec: str) -> tuple[str, str, str]:
    """LEVEL[:KERNELS[:BLOCK]] -> (level, kernels or "auto", block or "")."""
    parts = spec.split(":")
    return parts[0], parts[1] if len(parts) > 1 else "auto", parts[2] if len(parts) > 2 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="pg1-3b-224-l4")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", nargs="+", default=["int8:nbits:32", "int8:qgemm", "int8", "int4:nbits:32",
                                                         "int4:nbits:64", "int4:nbits:128", "int4:qgemm:32",
                                                         "int4:qgemm:64", "int4:qgemm:128", "int4"],
                        help="LEVEL[:KERNELS[:BLOCK]], e.g. int4:nbits:32, int4:qgemm:64, int4 (kernels measured)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/palionnx-bench"))
    parser.add_argument("--stem", help="suffix of the results file names")
    parser.add_argument("--stress", help="outlier variant of the checkpoint, e.g. a512c8 (testmodels/stress.py)")
    args = parser.parse_args()

    from palionnx.export.calibrate import spiky_channels
    from palionnx.export.convert import export
    from palionnx.runtime.contract import MANIFEST_NAME
    from palionnx.testmodels.stress import Stress, stress_checkpoint
    from palionnx.testmodels.synth import write_checkpoint

    base = args.work / args.geometry
    if not (base / "config.json").exists():
        write_checkpoint(args.geometry, base)
    checkpoint = base
    if args.stress:
        checkpoint = args.work / f"{args.geometry}-{args.stress}"
        if not (checkpoint / "config.json").exists():
            stress_checkpoint(base, checkpoint, Stress.parse(args.stress), spiky_channels)

    def folder(level: str) -> Path:
        """LEVEL[:KERNELS[:BLOCK]] as in compare.py: int4:nbits:32, int4:qgemm:64, int4 (kernels measured)."""
        quant, kernels, block = _parse_level(level)
        path = args.work / f"{checkpoint.name}-{level.replace(':', '-')}"
        if not (path / MANIFEST_NAME).exists():
            export(checkpoint, path, quant=quant, block_size=int(block) if block else None, kernels=kernels,
                   device="cpu" if quant != "fp16" else "auto", progress=print)
        return path

    images = sample_images(args.images, size=224)
    run = reference_run(Captioner.load(folder("fp32"), device="cpu"), images, max_new_tokens=args.tokens)
    rows = []
    for level in args.levels:
        report = agreement(Captioner.load(folder(level), device="cpu"), run)
        kernels = Manifest.load(folder(level)).quant.cpu_kernels
        summary = report.summary()
        rows.append({"level": level, "kernels": " / ".join((kernels.vision, kernels.prefill, kernels.decode))
                     if kernels else "—", "same_caption": summary["exact_match"],
                     "next_token_agreement": summary["forced_agreement"], "mean_cosine": summary["forced_cosine"],
                     "worst_image_cosine": report.worst(1)[0].forced_cosine})
        print(rows[-1], flush=True)
    write_results(args, checkpoint.name, rows)


def write_results(args: argparse.Namespace, name: str, rows: list[dict]) -> None:
    """benchmarks/results/quality-NAME[-STEM].{json,md}."""
    RESULTS.mkdir(exist_ok=True)
    stem = f"quality-{name}" + (f"-{args.stem}" if args.stem else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                                      indent=2, default=str) + "\n")
    table = [f"`{name}`, {args.images} images, up to {args.tokens} teacher-forced positions against fp32.",
             "", "| level | kernels (vision / prefill / decode) | same caption | next-token agreement | "
             "mean logit cosine | worst image's cosine |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    table += [f"| {r['level']} | {r['kernels']} | {r['same_caption']:.0%} | {r['next_token_agreement']:.1%} | "
              f"{r['mean_cosine']:.4f} | {r['worst_image_cosine']:.4f} |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

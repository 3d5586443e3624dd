"""Quality per quant level: teacher-forced next-token agreement with fp32 and mean logit cosine.

    python benchmarks/quality.py --geometry pg1-3b-224-l4 --images 8 --tokens 32

fp32 generates greedily; every other level is fed fp32's tokens (teacher forcing) and, at each position,
its argmax is compared with fp32's and its logits' cosine with fp32's is taken. Random weights are not a
trained model: these numbers measure how much each level perturbs the network, not caption quality.
Writes benchmarks/results/quality-GEOMETRY.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from palionnx import Captioner
from palionnx.runtime.defaults import DEFAULT_PROMPT
from palionnx.runtime.preprocess import image_pixels
from palionnx.samples import sample_images

RESULTS = Path(__file__).resolve().parent / "results"


def teacher_forced_logits(folder: Path, images, tokens: np.ndarray | None, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits [steps, b, vocab] along `tokens` [b, steps] (or along its own greedy choice when None)."""
    captioner = Captioner.load(folder, device="cpu")
    pixels = np.stack([image_pixels(image, captioner.image_spec) for image in images])
    batch = captioner.prompt_batch(pixels, [DEFAULT_PROMPT] * len(images))
    state = captioner.model.new_state(len(images), batch.input_ids.shape[1] + steps)
    output = state.prefill(batch)
    logits, chosen = [], []
    for step in range(steps):
        logits.append(output.logits())
        token = logits[-1].argmax(-1) if tokens is None else tokens[:, step]
        chosen.append(token)
        if step + 1 < steps:
            output = state.step(token)
    return np.stack(logits), np.stack(chosen, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="pg1-3b-224-l4")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", nargs="+", default=["fp16", "int8", "int4", "int4:64", "int4:128"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/palionnx-bench"))
    args = parser.parse_args()

    from palionnx.export.convert import export
    from palionnx.export.synth import write_checkpoint
    from palionnx.runtime.contract import MANIFEST_NAME

    checkpoint = args.work / args.geometry
    if not (checkpoint / "config.json").exists():
        write_checkpoint(args.geometry, checkpoint)

    def folder(level: str) -> Path:
        quant, _, block = level.partition(":")
        path = args.work / (f"{args.geometry}-{quant}" + (f"-b{block}" if block else ""))
        if not (path / MANIFEST_NAME).exists():
            export(checkpoint, path, quant=quant, block_size=int(block or 32), progress=print)
        return path

    images = sample_images(args.images, size=224)
    reference, tokens = teacher_forced_logits(folder("fp32"), images, None, args.tokens)
    rows = []
    for level in args.levels:
        logits, _ = teacher_forced_logits(folder(level), images, tokens, args.tokens)
        agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        cosine = (logits * reference).sum(-1) / np.linalg.norm(logits, axis=-1) / np.linalg.norm(reference, axis=-1)
        rows.append({"level": level, "next_token_agreement": agree, "mean_cosine": float(cosine.mean()),
                     "min_cosine": float(cosine.min())})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quality-{args.geometry}.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                                      indent=2, default=str) + "\n")
    table = [f"`{args.geometry}`, {args.images} images x {args.tokens} teacher-forced positions against fp32.", "",
             "| level | next-token agreement | mean logit cosine | min logit cosine |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r['level']} | {r['next_token_agreement']:.1%} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} |"
              for r in rows]
    (RESULTS / f"quality-{args.geometry}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""Quality per quant level: teacher-forced next-token agreement with fp32 and mean logit cosine.

    python benchmarks/quality.py --geometry pg1-3b-224-l4 --images 8 --tokens 32

fp32 generates greedily; every other level is fed fp32's tokens (teacher forcing) and, at each position,
its argmax is compared with fp32's and its logits' cosine with fp32's is taken. Random weights are not a
trained model: these numbers measure how much each level perturbs the network, not caption quality.
Levels name their CPU kernels (int4:qgemm:64: int8 QGEMM for the vision encoder and prefill, MatMulNBits int4
block 64 for decode): QGEMM quantizes activations per tensor at run time, which activation outliers can hurt.
Writes benchmarks/results/quality-GEOMETRY[-STEM].{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from palionnx import Captioner
from palionnx.runtime.defaults import DEFAULT_PROMPT
from palionnx.runtime.manifest import Manifest
from palionnx.runtime.preprocess import image_pixels
from palionnx.samples import sample_images

RESULTS = Path(__file__).resolve().parent / "results"


def teacher_forced_logits(folder: Path, images: list[Image.Image], tokens: np.ndarray | None,
                          steps: int) -> tuple[np.ndarray, np.ndarray]:
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


def add_outlier_channels(checkpoint: Path, factor: float, channels: int = 8) -> None:
    """Make a few channels of every linear layer's input `factor` times larger, as the activation outliers of
    trained language models: the RMSNorm gains (1 + w) of `channels` hidden channels before attention and the
    MLP, and `channels` rows of up_proj (so gelu(gate) * up, down_proj's input, has them too). Random weights
    have no outliers, and QGEMM's per-tensor activation quantization is what outliers hurt."""
    from safetensors.numpy import load_file, save_file

    path = checkpoint / "model.safetensors"
    weights = load_file(path)
    rng = np.random.default_rng(0)
    for name, tensor in weights.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) and "language_model" in name:
            picked = rng.choice(tensor.shape[0], channels, replace=False)
            tensor[picked] = (1 + tensor[picked]) * factor - 1  # Gemma's gain is 1 + w
        elif name.endswith("mlp.up_proj.weight") and "language_model" in name:
            tensor[rng.choice(tensor.shape[0], channels, replace=False)] *= factor
    save_file(weights, path, metadata={"format": "pt"})


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
    parser.add_argument("--outliers", type=float, default=0.0,
                        help="give the decoder activation outlier channels this many times larger (see "
                             "add_outlier_channels), as trained language models have")
    args = parser.parse_args()

    from palionnx.export.convert import export
    from palionnx.export.synth import write_checkpoint
    from palionnx.runtime.contract import MANIFEST_NAME

    checkpoint = args.work / (args.geometry + ("-outliers" if args.outliers else ""))
    if not (checkpoint / "config.json").exists():
        write_checkpoint(args.geometry, checkpoint)
        if args.outliers:
            add_outlier_channels(checkpoint, args.outliers)

    def folder(level: str) -> Path:
        """LEVEL[:KERNELS[:BLOCK]] as in compare.py: int4:nbits:32, int4:qgemm:64, int4 (kernels measured)."""
        quant, kernels, block = _parse_level(level)
        path = args.work / f"{checkpoint.name}-{level.replace(':', '-')}"
        if not (path / MANIFEST_NAME).exists():
            export(checkpoint, path, quant=quant, block_size=int(block) if block else None, kernels=kernels,
                   device="cpu" if quant != "fp16" else "auto", progress=print)
        return path

    images = sample_images(args.images, size=224)
    reference, tokens = teacher_forced_logits(folder("fp32"), images, None, args.tokens)
    rows = []
    for level in args.levels:
        logits, _ = teacher_forced_logits(folder(level), images, tokens, args.tokens)
        agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        cosine = (logits * reference).sum(-1) / np.linalg.norm(logits, axis=-1) / np.linalg.norm(reference, axis=-1)
        kernels = Manifest.load(folder(level)).quant.cpu_kernels
        rows.append({"level": level, "kernels": " / ".join((kernels.vision, kernels.prefill, kernels.decode))
                     if kernels else "—", "next_token_agreement": agree, "mean_cosine": float(cosine.mean()),
                     "min_cosine": float(cosine.min()), "prefill_cosine": float(cosine[0].mean())})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = f"quality-{checkpoint.name}" + (f"-{args.stem}" if args.stem else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                                      indent=2, default=str) + "\n")
    table = [f"`{checkpoint.name}`, {args.images} images x {args.tokens} teacher-forced positions against fp32.",
             "", "| level | kernels (vision / prefill / decode) | next-token agreement | mean logit cosine | "
             "min logit cosine | cosine after prefill |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    table += [f"| {r['level']} | {r['kernels']} | {r['next_token_agreement']:.1%} | {r['mean_cosine']:.4f} | "
              f"{r['min_cosine']:.4f} | {r['prefill_cosine']:.4f} |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

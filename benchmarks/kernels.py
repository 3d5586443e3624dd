"""The export's kernel measurement on its own: time the CPU kernel candidates at a geometry's shapes here.

    python benchmarks/kernels.py --geometry pg1-3b-224 --level int4
    python benchmarks/kernels.py --geometry pg1-3b-224 --level int8 --threads 2 --json probe.json

What `palionnx export --quant int4|int8 --device cpu` times before it writes a folder (export/tune.py): one
decoder layer's matrix products at the prompt's length (prefill), at one token and at 2-32 rows
(tune.BATCH_ROWS) with the weights read from memory (decode, batched decode), one vision layer's at the
image's tokens, on every candidate kernel; then the kernels it would choose and the batch from which decode
steps run on the prefill's kernel. No checkpoint is needed (random weights of the geometry's shapes) and nothing is
written but the optional JSON. GOP/s = 2 x rows x weights / time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import palionnx.export.tune as tune
from palionnx.export.options import KERNEL_CHOICES
from palionnx.testmodels.synth import GEOMETRIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="pg1-3b-224", choices=sorted(GEOMETRIES))
    parser.add_argument("--level", default="int4", choices=["int4", "int8"])
    parser.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: every core, as the runtime)")
    parser.add_argument("--json", type=Path, help="also write the timings and the choice here")
    args = parser.parse_args()

    g = GEOMETRIES[args.geometry]
    decoder = tune.decoder_probe(g.hidden, g.intermediate, g.heads, g.kv_heads, g.head_dim,
                                 g.image_seq_length + tune.PROMPT_TEXT_TOKENS)
    vision = tune.vision_probe(g.vision_hidden, g.vision_intermediate, g.image_seq_length)
    kernels = tune.allowed(args.level, g.hidden, args.kernels).kernels
    started = time.perf_counter()
    timings = tune.measure(kernels, decoder, vision, threads=args.threads)
    seconds = time.perf_counter() - started
    print(f"{tune.cpu_name()}, threads {args.threads or 'all'}; {seconds:.0f} s")
    batches = [f"batch{rows}" for rows in tune.BATCH_ROWS]
    print(f"{'kernel':12s} {'prefill ms':>11s} {'GOP/s':>7s} {'decode ms':>10s} "
          + " ".join(f"{b:>8s}" for b in batches) + f" {'vision ms':>10s} {'GOP/s':>7s}")
    for kernel in kernels:
        name = kernel.name
        pre, dec, vis = (timings[phase][name] for phase in ("prefill", "decode", "vision"))
        print(f"{name:12s} {pre:11.1f} {_gops(decoder, pre):7.0f} {dec:10.2f} "
              + " ".join(f"{timings[b][name]:8.2f}" for b in batches) + f" {vis:10.1f} {_gops(vision, vis):7.0f}")
    params = decoder.params * g.layers
    plan = tune.choose(args.level, g.hidden, params, args.kernels, None, lambda _: timings,
                       params + g.vocab_size * g.hidden * (8 if args.level == "int8" else 4) // 8)
    print(f"chosen: vision {plan.vision}, prefill {plan.prefill}, decode {plan.decode}, decode batches of "
          f"{plan.batch_decode_from or 'no'}+ rows on the prefill kernel (per layer, a {tune.CAPTION_TOKENS}-token "
          "caption: see export/tune.py; errors are not measured here: they need a model's activations)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": tune.cpu_name(), "threads": args.threads, "geometry": args.geometry,
                                         "level": args.level, "probe_ms": plan.probe_ms,
                                         "chosen": [plan.vision, plan.prefill, plan.decode],
                                         "batch_decode_from": plan.batch_decode_from}, indent=2) + "\n")


def _gops(probe: tune.Probe, ms: float) -> float:
    return 2 * probe.tokens * probe.params / ms / 1e6


if __name__ == "__main__":
    main()

"""CUDA check for a lent GPU machine: caption with device="cuda", confirm where the decoder's nodes ran.

    python benchmarks/gpu_check.py MODEL_DIR [MODEL_DIR ...]

For each folder: loads it on CUDA, captions 4 synthetic images at 64 fixed new tokens (warm-up excluded),
prints vision / prefill / decode ms per token, then re-runs one caption with onnxruntime's profiler and
counts the decoder's nodes per execution provider. Fails if any MatMulNBits (or any MatMul/Gemm) ran on
the CPU provider.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import onnxruntime as ort

from palionnx import Captioner
from palionnx.runtime import sessions
from palionnx.runtime.contract import DECODER
from palionnx.samples import sample_images


def node_providers(profile: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for event in json.loads(profile.read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            counts[(args["op_name"], args["provider"])] += 1
    return counts


def check(folder: Path) -> bool:
    captioner = Captioner.load(folder, device="cuda")
    images = sample_images(4, size=captioner.manifest.image_size)
    captioner.caption(images[:1], max_new_tokens=8, ignore_eos=True)  # warm-up
    result = captioner.caption(images, max_new_tokens=64, batch_size=1, ignore_eos=True)[0]
    t = result.timings
    print(f"{folder}: providers {captioner.providers}")
    print(f"  vision {1000 * t.vision_s:.1f} ms  prefill {1000 * t.prefill_s:.1f} ms  "
          f"decode {t.decode_ms_per_token:.2f} ms/token (batch 1, 64 tokens)")

    options = sessions.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder.name) + "-profile"
    decoder = ort.InferenceSession(str(folder / captioner.manifest.graphs[DECODER].file), options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    captioner.model.decoder = decoder
    captioner.caption(images[:1], max_new_tokens=4, ignore_eos=True)
    counts = node_providers(Path(decoder.end_profiling()))
    on_cpu = {op: n for (op, provider), n in counts.items() if provider == "CPUExecutionProvider"}
    print(f"  decoder nodes per provider: {dict(collections.Counter(p for (_, p) in counts.elements()))}")
    print(f"  on CPU: {on_cpu or 'none'}")
    return not any(op in ("MatMulNBits", "MatMul", "Gemm", "GatherBlockQuantized") for op in on_cpu)


if __name__ == "__main__":
    ok = all([check(Path(folder)) for folder in sys.argv[1:]])
    print("PASS" if ok else "FAIL: compute-heavy decoder nodes fell back to the CPU")
    sys.exit(0 if ok else 1)

"""Does a change alter what export writes? Export checkpoints at some levels and kernel choices with whichever
palionnx is first on the path, and print one line per folder: each file's SHA-256 (graphs hashed without
torch.onnx's per-node provenance, which names source files and lines), and the kernels chosen.

    cp benchmarks/export_identity.py /tmp/ids.py   # for the other tree, run a copy outside benchmarks/ (its
                                                   # kernels.py stands where transformers looks for `kernels`)
    PYTHONPATH=/tmp/old/src python /tmp/ids.py /tmp/ids/old CKPT... > old.txt
    python benchmarks/export_identity.py /tmp/ids/new CKPT... > new.txt
    diff old.txt new.txt      # nothing: the two trees write the same folders

`--cases LEVEL:DEVICE:KERNELS ...` (default: int4:cpu:auto int8:cpu:qgemm int8:cpu:auto int4:cuda:auto).
Kernels measured by timing (decoders of tune.MIN_MEASURED_PARAMS or more) may differ between runs by nature.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import onnx

from palionnx.export.convert import export


def digest(path: Path) -> str:
    """A file's SHA-256 (the first 16 digits); an ONNX graph's without its nodes' metadata and doc strings."""
    if path.suffix != ".onnx":
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return hashlib.sha256(model.SerializeToString()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--cases", nargs="+", default=["int4:cpu:auto", "int8:cpu:qgemm", "int8:cpu:auto",
                                                       "int4:cuda:auto"])
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        for case in args.cases:
            quant, device, kernels = case.split(":")
            folder = args.out / f"{checkpoint.name}-{quant}-{device}-{kernels}"
            if not (folder / "palionnx.json").exists():
                export(checkpoint, folder, quant=quant, device=device, kernels=kernels)
            files = {p.name: digest(p) for p in sorted(folder.iterdir()) if p.name != "palionnx.json"}
            chosen = json.loads((folder / "palionnx.json").read_text())["quant"].get("cpu_kernels") or {}
            kernels_used = {k: chosen.get(k) for k in ("vision", "prefill", "decode", "batch_decode_from")}
            print(folder.name, json.dumps(files, sort_keys=True), json.dumps(kernels_used), flush=True)


if __name__ == "__main__":
    main()

"""float16 against bfloat16 on CUDA for the decoder's dominant work: its weight-reading matrix products.

    python benchmarks/gpu_dtypes.py [--rows 1 8 64] [--layers 8]

Builds one ONNX graph per element type holding `--layers` MLP blocks of Gemma 2B's shape (2048 -> 16384 ->
2048, random weights, 128 MB per block in either type), runs it on onnxruntime's CUDA provider captured
as a CUDA graph at fixed addresses (what a decode step does), and prints ms per run and the weight bytes
read per second for each row count. A bf16 level can only decode faster than fp16 if these products run
faster: decode reads every weight once per step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HIDDEN, INTERMEDIATE = 2048, 16384


def bfloat16_tensor(name: str, values: np.ndarray) -> TensorProto:
    """A bfloat16 initializer: the upper 16 bits of each float32, rounded to nearest even."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, values.shape, rounded.tobytes(), raw=True)


def mlp_graph(dtype: int, layers: int, seed: int = 0) -> bytes:
    """x [rows, hidden] float16 -> `layers` x (MatMul up, MatMul down) in `dtype` -> float16."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    x = "x"
    if dtype == TensorProto.BFLOAT16:
        nodes.append(helper.make_node("Cast", [x], ["x_in"], to=TensorProto.BFLOAT16))
        x = "x_in"
    for i in range(layers):
        for part, shape in (("up", (HIDDEN, INTERMEDIATE)), ("down", (INTERMEDIATE, HIDDEN))):
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            name = f"w{i}_{part}"
            if dtype == TensorProto.BFLOAT16:
                initializers.append(bfloat16_tensor(name, values))
            else:
                initializers.append(helper.make_tensor(name, TensorProto.FLOAT16, shape,
                                                       values.astype(np.float16).tobytes(), raw=True))
            nodes.append(helper.make_node("MatMul", [x, name], [f"h{i}_{part}"]))
            x = f"h{i}_{part}"
    nodes.append(helper.make_node("Cast", [x], ["y"], to=TensorProto.FLOAT16))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["rows", HIDDEN])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def time_graph(model: bytes, rows: int, repeats: int) -> float:
    """ms per run of the captured graph at `rows` rows (median of `repeats`, after a warm-up)."""
    session = ort.InferenceSession(model, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    x = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(1).standard_normal((rows, HIDDEN)).astype(np.float16),
                                         "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type((rows, HIDDEN), np.float16, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_ortvalue_output("y", y)
    for _ in range(5):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - started)
    if not np.isfinite(y.numpy()).all():
        raise RuntimeError("non-finite output")
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-out")))
    args = parser.parse_args()
    weight_bytes = args.layers * 2 * HIDDEN * INTERMEDIATE * 2
    results = []
    for label, dtype in (("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16)):
        model = mlp_graph(dtype, args.layers)
        for rows in args.rows:
            ms = time_graph(model, rows, args.repeats)
            results.append({"dtype": label, "rows": rows, "ms": ms, "weight_gb_s": weight_bytes / ms / 1e6})
            print(json.dumps(results[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_dtypes.json").write_text(json.dumps({"onnxruntime": ort.__version__, "layers": args.layers,
                                                          "results": results}, indent=2) + "\n")
    print("| rows | float16 ms | bfloat16 ms | bf16 / fp16 |\n| ---: | ---: | ---: | ---: |")
    for rows in args.rows:
        half, brain = (next(r["ms"] for r in results if r["rows"] == rows and r["dtype"] == d)
                       for d in ("float16", "bfloat16"))
        print(f"| {rows} | {half:.3f} | {brain:.3f} | {brain / half:.2f} |")


if __name__ == "__main__":
    main()

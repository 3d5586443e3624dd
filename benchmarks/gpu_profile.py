"""Where a batch-1 decode step's time goes on a GPU, and what a change to the decoder graph would buy.

    python benchmarks/gpu_profile.py --work DIR --out DIR [--folders pg1-3b-224-fp16 ...] [--device cuda]
        [--parts settings products variants | --parts prepare]

For each model folder (built for CUDA, in --work):

1. the step three ways: through `DecoderState.step` (what a caption pays: token and length uploads, the
   step, the next token read back), replaying the step alone (nothing uploaded or read), and the GPU's
   kernel time per step (CUPTI, through torch.profiler when torch is there), with the kernels that take
   it, with the CUDA graph on and off;
2. variants of the decoder graph, rewritten on a copy of the folder that shares its weights (hard
   links): the argmax on the float16 logits, TopK(1) instead of ArgMax, a decode-only graph without the
   image merge and the last-position gather (prompts on the base graph), and a probe that breaks the tokens
   and only says what a piece costs (no argmax); the same checkpoint exported with linear_layout "nk" (linear
   weights [N, K], FusedMatMul transB=1: the "-nk" folder beside it, where profile-prep made one); for float16
   folders also gate_proj and up_proj packed into one product and a Split (a new weights file), of the folder
   and of its "nk" one. Timed in turns with the base folder. `--parts prepare` only makes the variants'
   folders (CPU work: the GPU check's profile-prep runs it).
3. settings (`SETTINGS`), one child process each: onnxruntime's attention kernel chosen by environment
   variables or the CUDA provider's `sdpa_kernel`, with the host pieces of a step (token upload, lengths
   upload, next-token read-back) timed by leaving each out, and the kernel table;
4. single products at the decoder's shapes, each captured in a CUDA graph: the time (per run, and of its
   kernels alone) and bytes/s of each fp16 linear layer as MatMul and as FusedMatMul over transposed weights,
   the lm_head Gemm, the ArgMax over the vocabulary (what the weights' floor can be reached at).

Writes gpu_profile.json and gpu_profile.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from palionnx import Captioner
from palionnx.runtime.contract import DECODER, GRAPH_FILES
from palionnx.runtime.defaults import DEFAULT_PROMPT
from palionnx.runtime.integrity import sha256_of
from palionnx.runtime.measure import decode_step_ms, device_name
from palionnx.runtime.preprocess import image_pixels
from palionnx.samples import sample_images

STEPS = int(os.environ.get("PROFILE_STEPS", "64"))
ROOM = 1024  # new tokens the cache has room for (the CUDA floor's length either way)


# --- timing ---------------------------------------------------------------------------------------------

def prefilled_state(captioner: Captioner, room: int = ROOM) -> tuple[Any, np.ndarray]:
    """A batch-1 state after the default prompt, warmed (and its CUDA graph captured), as
    `runtime.measure.decode_step_ms` makes it."""
    image = sample_images(1, size=captioner.manifest.image_size)[0]
    batch = captioner.prompt_batch(image_pixels(image, captioner.image_spec)[None], [DEFAULT_PROMPT])
    state = captioner.model.new_state(1, batch.input_ids.shape[1] + room)
    tokens = state.prefill(batch).next_token()
    for _ in range(3):
        tokens = state.step(tokens).next_token()
    state.reset()
    return state, state.prefill(batch).next_token()


def step_ms(captioner: Captioner) -> float:
    """ms per `DecoderState.step` (uploads, the step, the next token read back) over STEPS steps."""
    return decode_step_ms(captioner, ROOM, STEPS)


def replay_ms(captioner: Captioner) -> float:
    """ms per decode step with nothing uploaded or read back: the step (its CUDA graph replay) alone."""
    state, tokens = prefilled_state(captioner)
    state.step(tokens).next_token()
    started = time.perf_counter()
    for _ in range(STEPS):
        state._run_step()
    state.next_token.numpy()  # the last step is finished
    return 1000 * (time.perf_counter() - started) / STEPS


def loop_ms(captioner: Captioner, upload_tokens: bool = True, upload_lengths: bool = True,
            read_token: bool = True) -> float:
    """ms per decode step like `DecoderState.step`, leaving out the token upload, the lengths upload or the
    next token's read-back: what each host-side piece of a step costs, by difference."""
    state, tokens = prefilled_state(captioner)
    started = time.perf_counter()
    for _ in range(STEPS):
        if upload_tokens:
            state.token_ids.update_inplace(np.ascontiguousarray(tokens.reshape(-1, 1), dtype=np.int64))
        if upload_lengths:
            state.seqlens.update_inplace(state.lengths)
        state._run_step()
        state.lengths += 1
        if read_token:
            tokens = state.next_token.numpy()
    state.next_token.numpy()
    return 1000 * (time.perf_counter() - started) / STEPS


def in_turns(measures: dict[str, Callable[[], float]], rounds: int = 5) -> dict[str, float]:
    """The median of `rounds` runs of each measure, taken in turns so that drift hits all alike."""
    runs: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            runs[name].append(measure())
    return {name: statistics.median(values) for name, values in runs.items()}


def cupti_kernels(run: Callable[[], Any], steps: int, trace: Path) -> dict[str, Any]:
    """GPU kernel time per call of `run` (CUPTI through torch.profiler, read from its Chrome trace, which holds
    every kernel of the process, onnxruntime's too) and the kernels that take it."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError as error:
        return {"error": f"no torch.profiler: {error}"}
    if not torch.cuda.is_available():
        return {"error": "torch sees no GPU"}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            run()
        wall = time.perf_counter() - started
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text()).get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    trace.unlink()
    if not events:
        return {"error": "the trace holds no GPU events", "wall_ms_per_step_profiled": 1000 * wall / steps}
    kernels: dict[str, list[float]] = {}
    for e in events:
        kernels.setdefault(f"{e['cat']}: {e['name']}", []).append(float(e["dur"]))
    rows: list[dict[str, Any]] = sorted(
        ({"kernel": name[:120], "calls_per_step": len(times) / steps, "us_per_step": sum(times) / steps}
         for name, times in kernels.items()), key=lambda row: -row["us_per_step"])
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    return {"steps": steps, "wall_ms_per_step_profiled": 1000 * wall / steps,
            "gpu_span_ms_per_step": span / steps / 1000,
            "kernel_ms_per_step": sum(row["us_per_step"] for row in rows) / 1000,
            "kernels_per_step": sum(row["calls_per_step"] for row in rows), "top": rows[:40]}


def kernel_profile(captioner: Captioner, trace: Path, steps: int = 32) -> dict[str, Any]:
    """`cupti_kernels` over `steps` decode steps of a prefilled batch-1 state."""
    state, tokens = prefilled_state(captioner)
    box = [tokens]

    def step() -> None:
        box[0] = state.step(box[0]).next_token()

    return cupti_kernels(step, steps, trace)


# --- graph variants -------------------------------------------------------------------------------------

def _node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(n for n in graph.node if n.name == name)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is used (repeatedly)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def argmax_fp16(graph: onnx.GraphProto) -> None:
    """The ArgMax reads the float16 logits (before their Cast to float32)."""
    cast = _node(graph, "head/logits")
    if cast.op_type == "Cast":
        _node(graph, "head/argmax").input[0] = cast.input[0]


def topk(graph: onnx.GraphProto) -> None:
    """TopK(1) on the float16 logits instead of ArgMax."""
    argmax = _node(graph, "head/argmax")
    source = _node(graph, "head/logits")
    logits = source.input[0] if source.op_type == "Cast" else argmax.input[0]
    out = argmax.output[0]
    graph.node.remove(argmax)
    k = helper.make_tensor("probe/k", onnx.TensorProto.INT64, [1], [1])
    flat = helper.make_tensor("probe/flat", onnx.TensorProto.INT64, [1], [-1])
    graph.initializer.extend([k, flat])
    graph.node.extend([helper.make_node("TopK", [logits, "probe/k"], ["probe/values", "probe/index"], "probe/topk"),
                       helper.make_node("Reshape", ["probe/index", "probe/flat"], [out], "probe/flat")])


def no_argmax(graph: onnx.GraphProto) -> None:
    """Probe: next_token is last_index (no argmax at all; the tokens are wrong)."""
    argmax = _node(graph, "head/argmax")
    out = argmax.output[0]
    graph.node.remove(argmax)
    graph.node.append(helper.make_node("Identity", [graph.input[4].name], [out], "probe/no_argmax"))


def decode_lean(graph: onnx.GraphProto) -> None:
    """A decode-only graph: no image merge (the text embedding goes straight in; decode steps feed text
    tokens only) and no gather of each row's last position (a step has one position per row). Prompts cannot
    run on it: the folder's own decoder runs them (`LEAN` below), as a prefill graph would."""
    merge = _node(graph, "embed/merge")
    last = _node(graph, "head/last")
    for old, new in ((merge.output[0], merge.input[2]), (last.output[0], last.input[0])):
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new
    _prune(graph)


def decode_lean_argmax_fp16(graph: onnx.GraphProto) -> None:
    decode_lean(graph)
    argmax_fp16(graph)


def gate_up_packed(model: onnx.ModelProto) -> None:
    """Each layer's gate_proj and up_proj as one product over their weights side by side ([K, 2N] for MatMul,
    [2N, K] for an "nk" folder's FusedMatMul) and a Split: one GEMV twice as wide instead of two (a Split
    kernel in place of the second launch). Rewrites the weights file."""
    graph = model.graph
    weights = {w.name: w for w in graph.initializer}
    for gate in [n for n in graph.node if n.op_type in ("MatMul", "FusedMatMul") and n.name.endswith("/gate_proj")]:
        up = _node(graph, gate.name.removesuffix("gate_proj") + "up_proj")
        w_gate, w_up = weights[gate.input[1]], weights[up.input[1]]
        axis = 0 if gate.op_type == "FusedMatMul" else 1  # the output dimension: N of [N, K] or of [K, N]
        both = np.concatenate([onnx.numpy_helper.to_array(w) for w in (w_gate, w_up)], axis=axis)
        w_gate.CopyFrom(onnx.numpy_helper.from_array(both, w_gate.name))
        graph.initializer.remove(w_up)
        sizes = helper.make_tensor(f"{gate.name}/sizes", onnx.TensorProto.INT64, [2], [both.shape[axis] // 2] * 2)
        graph.initializer.append(sizes)
        outputs = [gate.output[0], up.output[0]]
        gate.output[0] = f"{gate.name}/both"
        split = helper.make_node("Split", [gate.output[0], sizes.name], outputs, f"{gate.name}/split", axis=-1)
        at = list(graph.node).index(up)
        graph.node.remove(up)
        graph.node.insert(at, split)


WEIGHT_VARIANTS: dict[str, Callable[[onnx.ModelProto], None]] = {"gate-up-packed": gate_up_packed}

VARIANTS: dict[str, Callable[[onnx.GraphProto], None]] = {
    "argmax-fp16": argmax_fp16,
    "topk": topk,
    "probe-no-argmax": no_argmax,
    "decode-lean": decode_lean,
    "decode-lean-argmax-fp16": decode_lean_argmax_fp16,
}
LEAN = ("decode-lean", "decode-lean-argmax-fp16")  # their prompts run on the base folder's decoder


def _read_weights(model: onnx.ModelProto, folder: Path) -> None:
    """Load the external weights into the model by hand (onnx refuses a weights file with several hard links,
    which the other variants' folders give it)."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        with open(folder / info["location"], "rb") as handle:
            handle.seek(int(info.get("offset", 0)))
            tensor.raw_data = handle.read(int(info["length"]))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def make_variant(folder: Path, name: str, change: Callable[[onnx.GraphProto], None] | None = None,
                 rewrite: Callable[[onnx.ModelProto], None] | None = None) -> Path:
    """A copy of `folder` (hard links to its files) whose decoder graph has `change` applied, or whose decoder
    graph and weights file (a new file) are rewritten by `rewrite`. One made before (its manifest is written
    last) is taken as it is."""
    target = folder.parent / f"{folder.name}--{name}"
    if (target / "palionnx.json").exists():
        return target
    target.mkdir(exist_ok=True)
    graph_file = GRAPH_FILES[DECODER]
    rewritten = [graph_file, "palionnx.json"] + [f"{graph_file}.data"] * (rewrite is not None)
    for path in folder.iterdir():
        link = target / path.name
        if path.name not in rewritten and not link.exists():
            os.link(path, link)  # a hard link: onnxruntime refuses external data behind a symbolic link
    manifest = json.loads((folder / "palionnx.json").read_text())
    if rewrite is not None:
        model = onnx.load(str(folder / graph_file), load_external_data=False)
        _read_weights(model, folder)
        rewrite(model)
        (target / f"{graph_file}.data").unlink(missing_ok=True)
        onnx.save(model, str(target / graph_file), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{graph_file}.data", size_threshold=1024)
    else:
        model = onnx.load(str(folder / graph_file), load_external_data=False)
        assert change is not None
        change(model.graph)
        onnx.save(model, str(target / graph_file))
    for written in rewritten[:1] + rewritten[2:]:
        manifest["files"][written] = {"size": (target / written).stat().st_size,
                                      "sha256": sha256_of(target / written)}
    (target / "palionnx.json").write_text(json.dumps(manifest, indent=2))
    return target


def _weight_variant(folder: Path, name: str) -> Path:
    return make_variant(folder, name, rewrite=WEIGHT_VARIANTS[name])


def make_variants(folder: Path, jobs: int = 1) -> dict[str, Path]:
    """Every variant of `folder` this GPU can run, and where profile-prep exported it, the same checkpoint with
    linear_layout "nk" (the "-nk" folder beside it). CUDA has no ArgMax or TopK for bfloat16, so the head
    variants need float16 logits; the weight variants (a new weights file each, `jobs` processes at once,
    each holding the model twice; of the folder and of its "nk" one) are made for float16 folders only,
    which keeps them within the GPU machine's disk."""
    bf16 = "bf16" in folder.name
    names = [n for n in VARIANTS if not (bf16 and ("argmax-fp16" in n or n == "topk"))]
    made = {name: make_variant(folder, name, VARIANTS[name]) for name in names}
    bases = {"": folder}
    nk = folder.parent / f"{folder.name}-nk"
    if nk.is_dir():
        made["nk"] = bases["nk-"] = nk
    todo = [] if bf16 else [(prefix, base, name) for prefix, base in bases.items() for name in WEIGHT_VARIANTS]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            paths = list(pool.map(_weight_variant, [t[1] for t in todo], [t[2] for t in todo]))
    else:
        paths = [_weight_variant(base, name) for _, base, name in todo]
    made.update({prefix + name: path for (prefix, _, name), path in zip(todo, paths)})
    return made


def same_tokens(a: Captioner, b: Captioner) -> bool:
    images = sample_images(2, size=a.manifest.image_size)
    first = [r.text for r in a.caption(images, max_new_tokens=24, batch_size=2)]
    return first == [r.text for r in b.caption(images, max_new_tokens=24, batch_size=2)]


# --- single products ------------------------------------------------------------------------------------

def product_us(nodes: list, inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray], output: str,
               out: np.ndarray, device: str, repeats: int = 200) -> tuple[float, float | None]:
    """µs per run of a one-node graph writing into a buffer like `out`, captured as a CUDA graph on CUDA: the
    run's wall time and (on CUDA, with torch there) the GPU kernels' time alone."""
    out_type = helper.np_dtype_to_tensor_dtype(out.dtype)
    graph = helper.make_graph(
        nodes, "product",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(output, out_type, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if device == "cuda":
        providers: list[Any] = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    binding = session.io_binding()
    for k, v in inputs.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, device, 0))
    binding.bind_ortvalue_output(output, ort.OrtValue.ortvalue_from_numpy(out, device, 0))
    for _ in range(3):
        session.run_with_iobinding(binding)
    started = time.perf_counter()
    for _ in range(repeats):
        session.run_with_iobinding(binding)
    wall = 1e6 * (time.perf_counter() - started) / repeats
    if device != "cuda":
        return wall, None
    kernels = cupti_kernels(lambda: session.run_with_iobinding(binding), 50, Path("/tmp/trace-product.json"))
    return wall, 1000 * kernels["kernel_ms_per_step"] if "kernel_ms_per_step" in kernels else None


def products(device: str, hidden: int = 2048, inter: int = 16384, vocab: int = 257216) -> list[dict[str, Any]]:
    """The decoder's single products at batch 1 (pg1-3b-224's shapes): µs each and the bytes/s they reach."""
    rng = np.random.default_rng(0)
    f16, f32, rows = np.float16, np.float32, []

    def normal(*shape: int, dtype: Any = f16) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=f32) * 0.01).astype(dtype)

    def matmul(k: int, n: int) -> tuple:
        return ([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": normal(1, k)}, {"w": normal(k, n)},
                np.zeros((1, n), f16), 2 * k * n)

    def transposed(k: int, n: int) -> tuple:  # the weight as [N, K] (PyTorch's layout), FusedMatMul transB=1
        node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", transB=1)
        return [node], {"x": normal(1, k)}, {"w": normal(n, k)}, np.zeros((1, n), f16), 2 * k * n

    argmax = [helper.make_node("ArgMax", ["l"], ["y"], axis=-1, keepdims=0)]
    cases = {
        "MatMul fp16 2048x16384 (gate, up)": matmul(hidden, inter),
        "MatMul fp16 16384x2048 (down)": matmul(inter, hidden),
        "MatMul fp16 2048x2560 (qkv)": matmul(hidden, 2560),
        "MatMul fp16 2048x2048 (o_proj)": matmul(hidden, hidden),
        "FusedMatMul transB fp16 2048x16384 (gate, up)": transposed(hidden, inter),
        "FusedMatMul transB fp16 16384x2048 (down)": transposed(inter, hidden),
        "FusedMatMul transB fp16 2048x2560 (qkv)": transposed(hidden, 2560),
        "FusedMatMul transB fp16 2048x2048 (o_proj)": transposed(hidden, hidden),
        "MatMul fp16 2048x32768 (gate and up packed)": matmul(hidden, 2 * inter),
        "FusedMatMul transB fp16 2048x32768 (gate and up packed)": transposed(hidden, 2 * inter),
        "Gemm transB fp16 (lm_head)": ([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                                       {"x": normal(1, hidden)}, {"w": normal(vocab, hidden)},
                                       np.zeros((1, vocab), f16), 2 * hidden * vocab),
        "ArgMax fp32 over the vocabulary": (argmax, {"l": normal(1, vocab, dtype=f32)}, {}, np.zeros(1, np.int64),
                                            4 * vocab),
        "ArgMax fp16 over the vocabulary": (argmax, {"l": normal(1, vocab)}, {}, np.zeros(1, np.int64), 2 * vocab),
        "Cast fp16->fp32 of the logits": ([helper.make_node("Cast", ["l"], ["y"], to=1)], {"l": normal(1, vocab)}, {},
                                          np.zeros((1, vocab), f32), 6 * vocab),
    }
    for name, (nodes, inputs, weights, out, nbytes) in cases.items():
        try:
            us, kernel_us = product_us(nodes, inputs, weights, "y", out, device)
            rows.append({"product": name, "us": us, "kernel_us": kernel_us,
                         "GB_per_s": nbytes / (kernel_us or us) / 1e3})
        except Exception as error:  # a probe: report and go on
            rows.append({"product": name, "error": str(error)[:200]})
        print(rows[-1], flush=True)
    return rows


# --- attention kernels and host pieces, one child process per setting -------------------------------------

# onnxruntime picks GroupQueryAttention's kernel by environment variables and the CUDA provider's
# `sdpa_kernel` bitmask (1 flash, 2 memory-efficient, 8 cuDNN); without either it prefers cuDNN on SM >= 90.
SETTINGS: dict[str, tuple[dict[str, str], dict[str, str]]] = {  # name: (environment, CUDA provider options)
    "default": ({}, {}),
    "env cuDNN attention off": ({"ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"}, {}),
    "sdpa_kernel=1 (flash)": ({}, {"sdpa_kernel": "1"}),
    "sdpa_kernel=3 (flash, efficient)": ({}, {"sdpa_kernel": "3"}),
    "sdpa_kernel=1, flash decode off": ({"ORT_DISABLE_FLASH_DECODE": "1"}, {"sdpa_kernel": "1"}),
    "sdpa_kernel=2 (efficient)": ({}, {"sdpa_kernel": "2"}),
}


def with_cuda_options(extra: dict[str, str]) -> None:
    """Every session this process opens from now on gets `extra` among its CUDA provider options."""
    real = ort.InferenceSession

    def session(path: Any, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        def add(p: Any) -> Any:
            if p == "CUDAExecutionProvider":
                return (p, dict(extra))
            if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider":
                return (p[0], {**p[1], **extra})
            return p
        return real(path, sess_options=sess_options, providers=[add(p) for p in providers or []], **kwargs)

    ort.InferenceSession = session


def setting_child(folder: Path, device: str, options: dict[str, str]) -> dict[str, Any]:
    """In a child process (its environment already set): one setting's step timings, pieces, kernels."""
    with_cuda_options(options)
    c = Captioner.load(folder, device=device)
    images = sample_images(2, size=c.manifest.image_size)
    row: dict[str, Any] = {"tokens": [r.tokens for r in c.caption(images, max_new_tokens=24, batch_size=2)]}
    row.update(in_turns({
        "step_ms": lambda: step_ms(c),
        "replay_ms": lambda: replay_ms(c),
        "no_token_upload_ms": lambda: loop_ms(c, upload_tokens=False),
        "no_lengths_upload_ms": lambda: loop_ms(c, upload_lengths=False),
        "no_read_back_ms": lambda: loop_ms(c, read_token=False),
        "no_host_pieces_ms": lambda: loop_ms(c, False, False, False),
    }))
    row["cuda_graph"] = c.model.cuda_graph
    if device == "cuda":
        try:
            k = kernel_profile(c, Path(f"/tmp/trace-{folder.name}-setting.json"))
            row["kernels"] = {**{key: v for key, v in k.items() if key != "top"}, "top": k.get("top", [])[:14]}
        except Exception as error:  # a probe: report and go on
            row["kernels"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return row


def sweep_settings(folder: Path, device: str) -> dict[str, Any]:
    """Each of SETTINGS in its own child process (environment variables are read once per process)."""
    rows: dict[str, Any] = {}
    default_tokens = None
    for name, (env, options) in SETTINGS.items():
        child = subprocess.run([sys.executable, __file__, "--work", str(folder.parent), "--device", device,
                                "--setting-child", str(folder), "--cuda-options", json.dumps(options)],
                               capture_output=True, text=True, env={**os.environ, **env})
        if child.returncode:
            rows[name] = {"error": child.stderr.strip()[-400:]}
        else:
            rows[name] = json.loads(child.stdout.strip().splitlines()[-1])
            tokens = rows[name].pop("tokens")
            default_tokens = tokens if name == "default" else default_tokens
            rows[name]["same_tokens_as_default"] = tokens == default_tokens
        print(folder.name, name, {k: v for k, v in rows[name].items() if k not in ("kernels", "tokens")}, flush=True)
    return {"model": folder.name, "settings": rows}


# --- driver ---------------------------------------------------------------------------------------------

def profile_folder(folder: Path, device: str) -> dict[str, Any]:
    report: dict[str, Any] = {"model": folder.name}
    base = Captioner.load(folder, device=device)
    loaded, report["failed"] = {"base": base}, {}
    for name, path in make_variants(folder).items():  # a variant onnxruntime cannot run here is reported, not fatal
        try:
            loaded[name] = Captioner.load(path, device=device)
            if name in LEAN:  # a decode-only graph: prompts run on the base folder's decoder
                loaded[name].model.prefill_decoder = base.model.decoder
            loaded[name].caption(sample_images(1, size=base.manifest.image_size), max_new_tokens=2)
        except Exception as error:
            report["failed"][name] = f"{type(error).__name__}: {error}"[:300]
            loaded.pop(name, None)
    report["same_tokens_as_base"] = {name: same_tokens(base, c) for name, c in loaded.items()
                                     if not name.startswith("probe")}
    report["step_ms"] = in_turns({name: partial(step_ms, c) for name, c in loaded.items()})
    report["replay_ms"] = in_turns({name: partial(replay_ms, c) for name, c in loaded.items()})
    report["cuda_graph"] = {name: c.model.cuda_graph for name, c in loaded.items()}  # False: capture failed
    print(folder.name, report, flush=True)
    del loaded
    if device == "cuda":
        for key, captioner in (("kernels_graph_off", Captioner.load(folder, device=device, cuda_graph=False)),
                               ("kernels_graph_on", base)):
            try:
                report[key] = kernel_profile(captioner, Path(f"/tmp/trace-{folder.name}-{key}.json"))
            except Exception as error:  # the profile is a probe: report and go on
                report[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Decode-step profile: {report['gpu']}, onnxruntime {report['onnxruntime']}", "",
             "Batch 1, the default prompt, the cache at the shipped floor; medians of 5 turns of 64 steps.", ""]
    for folder in report.get("folders", []):
        lines += [f"## {folder['model']}", "", "| variant | step ms (as captions run) | replay ms (step alone) |"
                  " same tokens |", "| --- | ---: | ---: | --- |"]
        for name, ms in folder["step_ms"].items():
            same = folder["same_tokens_as_base"].get(name, "(probe)")
            lines.append(f"| {name} | {ms:.3f} | {folder['replay_ms'][name]:.3f} | {same} |")
        for name, error in folder.get("failed", {}).items():
            lines.append(f"| {name} | did not run: {error[:120]} | | |")
        for key in ("kernels_graph_off", "kernels_graph_on"):
            k = folder.get(key, {})
            if "top" not in k:
                lines += ["", f"{key}: {k.get('error', 'not measured')}"]
                continue
            lines += ["", f"### {key}: {k['kernel_ms_per_step']:.3f} ms of kernels per step, "
                      f"{k['kernels_per_step']:.0f} kernels, GPU span {k['gpu_span_ms_per_step']:.3f} ms, "
                      f"{k['wall_ms_per_step_profiled']:.3f} ms wall (profiled)",
                      "", "| kernel | calls/step | µs/step |", "| --- | ---: | ---: |"]
            lines += [f"| `{r['kernel']}` | {r['calls_per_step']:.1f} | {r['us_per_step']:.1f} |"
                      for r in k["top"][:25]]
        lines.append("")
    for sweep in report.get("settings", []):
        lines += [f"## {sweep['model']}: attention kernel and host pieces (one process per setting)", "",
                  "| setting | step ms | replay ms | no token upload | no lengths upload | no read-back | "
                  "no host pieces | kernel ms/step | kernels/step | same tokens | CUDA graph |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for name, row in sweep["settings"].items():
            if "error" in row:
                lines.append(f"| {name} | {row['error'][-150:]} |")
                continue
            k = row.get("kernels", {})
            lines.append(f"| {name} | {row['step_ms']:.3f} | {row['replay_ms']:.3f} | "
                         f"{row['no_token_upload_ms']:.3f} | {row['no_lengths_upload_ms']:.3f} | "
                         f"{row['no_read_back_ms']:.3f} | "
                         f"{row['no_host_pieces_ms']:.3f} | {k.get('kernel_ms_per_step', float('nan')):.3f} | "
                         f"{k.get('kernels_per_step', float('nan')):.0f} | {row['same_tokens_as_default']} | "
                         f"{row['cuda_graph']} |")
        for name, row in sweep["settings"].items():
            top = row.get("kernels", {}).get("top", [])
            if top:
                lines += ["", f"{name}: " + "; ".join(f"{r['kernel'][:60]} {r['us_per_step']:.0f} µs"
                                                      for r in top[:8])]
        lines.append("")
    if report.get("products"):
        lines += ["## Single products (CUDA graph)", "", "GB/s from the kernels' time where CUPTI gave it.", "",
                  "| product | µs per run | µs of kernels | GB/s |", "| --- | ---: | ---: | ---: |"]
    for row in report.get("products", []):
        kernel_us = f"{row['kernel_us']:.1f}" if row.get("kernel_us") else "—"
        lines.append(f"| {row['product']} | {row['us']:.1f} | {kernel_us} | {row['GB_per_s']:.0f} |" if "us" in row
                     else f"| {row['product']} | {row['error']} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-out")))
    parser.add_argument("--folders", nargs="+", default=["pg1-3b-224-fp16", "pg1-3b-224-bf16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=1, help="processes making the weight variants (prepare)")
    parser.add_argument("--parts", nargs="+", default=["products", "variants", "settings"],
                        choices=["prepare", "products", "variants", "settings"])
    parser.add_argument("--setting-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cuda-options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting_child:
        print(json.dumps(setting_child(args.setting_child, args.device, json.loads(args.cuda_options))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = device_name(args.device)
    report: dict[str, Any] = {"gpu": gpu, "onnxruntime": ort.__version__, "products": [], "folders": [],
                              "settings": []}
    save = lambda: (args.out / "gpu_profile.json").write_text(json.dumps(report, indent=2) + "\n")  # noqa: E731
    folders = [args.work / name for name in args.folders if (args.work / name).is_dir()]
    if args.parts == ["prepare"]:  # the variants' folders only (CPU work, while the GPU kit arrives)
        for folder in folders:
            started = time.perf_counter()
            made = make_variants(folder, args.jobs)
            print(folder.name, sorted(made), f"{time.perf_counter() - started:.0f} s", flush=True)
        return
    if "settings" in args.parts:  # first: the attention kernel and the host's share of a step
        for folder in folders:
            report["settings"].append(sweep_settings(folder, args.device))
            save()
    if "products" in args.parts:
        report["products"] = products(args.device)
        save()
    if "variants" in args.parts:
        for folder in folders:
            report["folders"].append(profile_folder(folder, args.device))
            save()
    table = markdown(report)
    (args.out / "gpu_profile.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

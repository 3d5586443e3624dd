"""The kernels of a CPU-built int8/int4 folder, chosen by timing the candidates on this machine.

Which formulation of the matrix products is fastest depends on the CPU: on one x86 CPU MatMulNBits' int4
kernels run a prefill-sized product at fp32 speed while onnxruntime's int8 QGEMM runs it 4x faster; on
another the gap is smaller; block size 32 can be the slowest at every shape. So the export for the CPU
(which usually runs on the machine that captions: `palionnx caption --model HUB_ID` exports on first use)
times, at the model's real shapes, one decoder layer's matrix products at the prompt's length (prefill)
and at one token (decode, weights read from memory, not from cache), and one vision layer's at the image's
tokens, on every candidate kernel (export/quantize.py's `Kernel`), then picks:

- decode: the decoder graph's kernel, MatMulNBits at the level's bits (int8 may also use QGEMM: the same
  bytes per weight), minimising a caption's cost: CAPTION_TOKENS decode steps plus the prefill;
- prefill: on the decoder graph itself, or on a second graph (`decoder_prefill`) whose linear layers use
  int8 QGEMM, sharing the rest of the weights. It holds int8 copies of the layers (for the 3B int4 model
  ~2 GB more on disk and in memory), so it is chosen only when it makes prefill SPLIT_GAIN times faster;
- vision: the fastest kernel at the image's tokens (the vision encoder only ever runs compute-bound).

Candidates are checked against a float product; one whose error is far beyond its quantization's (a
kernel that saturates) is never chosen. Users narrow the choice (`kernels`, `block_size`); decoders too
small to time meaningfully keep the defaults. The result, with every candidate's timings, is recorded in
the manifest (`CpuKernels`) and shown by `palionnx bench`. Never imports torch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import system
from ..runtime.defaults import DEFAULT_BLOCK_SIZE
from ..runtime.manifest import CpuKernels
from .quantize import BITS, CPU_ACCURACY_LEVEL, OPSET, QGEMM, Kernel

PROMPT_TEXT_TOKENS = 4  # <bos>, a short prompt and "\n" after the image tokens: the prefill probe's rows
CAPTION_TOKENS = 64  # decode steps per caption, when weighing decode against prefill
MARGIN = 0.10  # a coarser kernel (larger error) or a second graph only when it is this much faster
MAX_SPLIT_MEMORY = 0.25  # ... and only where its weights take at most this share of the machine's memory
SPLIT_GAIN = 1.3  # a second (int8) prefill graph costs memory: only for at least this prefill speed-up
MIN_MEASURED_PARAMS = 50_000_000  # smaller decoders keep the defaults: their products time overheads
BLOCK_SIZES = {"int4": (32, 64, 128), "int8": (32, 64, 128, 256)}  # int4 beyond 128 loses too much accuracy
MAX_ERROR = {4: 0.25, 8: 0.05}  # relative error of a probe product beyond which a kernel is broken here
KERNEL_CHOICES = ("auto", "nbits", "qgemm")


@dataclass(frozen=True)
class Probe:
    """One layer's matrix products at real shapes: (K, N) of each, run at `tokens` rows."""

    shapes: tuple[tuple[int, int], ...]
    tokens: int

    @property
    def params(self) -> int:
        return sum(k * n for k, n in self.shapes)


@dataclass(frozen=True)
class Timing:
    """One kernel on one probe: best ms per layer and the relative error against the float product."""

    ms: float
    error: float


def decoder_probe(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                  prompt_tokens: int) -> Probe:
    """A decoder layer: packed QKV, o_proj, gate, up, down."""
    attention = heads * head_dim
    qkv = attention + 2 * kv_heads * head_dim
    shapes = ((hidden, qkv), (attention, hidden), (hidden, intermediate), (hidden, intermediate),
              (intermediate, hidden))
    return Probe(shapes, prompt_tokens)


def vision_probe(hidden: int, intermediate: int, image_tokens: int) -> Probe:
    """A SigLIP layer: q, k, v, o, fc1, fc2."""
    return Probe(((hidden, hidden),) * 4 + ((hidden, intermediate), (intermediate, hidden)), image_tokens)


@dataclass(frozen=True)
class Allowed:
    """What the user's settings leave to choose: decode-graph and vision kernels, and the prefill graph
    ("never" a separate one, "measured": when it pays, "always")."""

    decode: list[Kernel]
    vision: list[Kernel]
    split: str

    @property
    def kernels(self) -> list[Kernel]:
        """Every kernel to time."""
        extra = [QGEMM] if self.split != "never" else []
        return list(dict.fromkeys([*self.decode, *self.vision, *extra]))

    @property
    def fixed(self) -> bool:
        return len(self.decode) == 1 and len(self.vision) == 1 and self.split != "measured"


def allowed(level: str, hidden: int, kernels: str = "auto", block_size: int | None = None) -> Allowed:
    """The candidates under `kernels` ("auto", "nbits": MatMulNBits only, "qgemm": vision and prefill on
    QGEMM, and for int8 the whole decoder) and `block_size` (None: measured)."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {kernels!r}: use one of {', '.join(KERNEL_CHOICES)}")
    blocks = [block_size] if block_size else [b for b in BLOCK_SIZES[level] if hidden % b == 0]
    nbits = [Kernel("nbits", BITS[level], b) for b in blocks]
    if kernels == "nbits":
        return Allowed(nbits, nbits, "never")
    if kernels == "qgemm":
        return Allowed([QGEMM] if level == "int8" else nbits, [QGEMM], "never" if level == "int8" else "always")
    return Allowed(nbits + ([QGEMM] if level == "int8" else []), [*nbits, QGEMM], "measured")


Measure = Callable[[list[Kernel]], dict[str, dict[str, Timing]]]


def choose(level: str, hidden: int, decoder_params: int, kernels: str = "auto", block_size: int | None = None,
           measure: Measure | None = None, split_bytes: int = 0) -> CpuKernels:
    """The folder's kernels. When there is a choice left and the decoder is big enough, `measure(kernels)`
    times the candidates ({"decode" | "prefill" | "vision": {kernel name: Timing}}); otherwise the first
    candidate of each (MatMulNBits at the default block size unless the user said otherwise). A prefill
    graph whose memory (`split_bytes`) would exceed MAX_SPLIT_MEMORY of this machine's is not measured."""
    options = allowed(level, hidden, kernels, block_size)
    if options.split == "measured" and split_bytes > MAX_SPLIT_MEMORY * physical_memory():
        options = dataclasses.replace(options, split="never")  # the vision encoder may still use QGEMM
    if options.fixed or decoder_params < MIN_MEASURED_PARAMS or measure is None:
        decode = next((k for k in options.decode if k.block_size in (0, block_size or DEFAULT_BLOCK_SIZE)),
                      options.decode[0])
        vision = next((k for k in options.vision if k.name == decode.name), options.vision[0])
        by = "user" if kernels != "auto" or block_size else "default"
        return _plan(decode, QGEMM if options.split == "always" else decode, vision, by)
    timings = measure(options.kernels)
    correct = {phase: {name: t for name, t in by.items() if t.error <= MAX_ERROR[Kernel.parse(name).bits]}
               for phase, by in timings.items()}
    plan = _plan(*_cheapest(options, correct), "measurement")
    plan.cpu = cpu_name()
    names = {name for by in timings.values() for name in by}
    plan.probe_ms = {name: {phase: round(by[name].ms, 3) for phase, by in timings.items() if name in by}
                     for name in sorted(names)}
    plan.probe_error = {name: round(max(by[name].error for by in timings.values() if name in by), 4)
                        for name in sorted(names)}
    return plan


def _cheapest(options: Allowed, times: dict[str, dict[str, Timing]]) -> tuple[Kernel, Kernel, Kernel]:
    """(decode, prefill, vision) kernels. A plan's cost is a caption's: CAPTION_TOKENS decode steps plus the
    prefill, on the decode graph (shared) or on a QGEMM prefill graph (split). Among plans within MARGIN of
    the cheapest, the smallest error (finer blocks) wins. The split plan is taken when allowed, cheaper,
    and its prefill SPLIT_GAIN times faster than the shared plan's; the vision kernel likewise by its time."""
    dec, pre, vis = times["decode"], times["prefill"], times["vision"]
    usable = [k for k in options.decode if k.name in dec and k.name in pre] or options.decode[:1]

    def cost(decode: Kernel, prefill: Kernel) -> float:
        return CAPTION_TOKENS * dec.get(decode.name, Timing(0.0, 0.0)).ms + pre.get(prefill.name, Timing(1e9, 0.0)).ms

    def pick(plans: list[tuple[float, Kernel, Kernel]], by: dict[str, Timing]) -> tuple[float, Kernel, Kernel]:
        return min(_near_best(plans), key=lambda p: (by[p[1].name].error if p[1].name in by else 0.0, p[0]))

    shared = pick([(cost(k, k), k, k) for k in usable], dec) if options.split != "always" else None
    split = pick([(cost(k, QGEMM), k, QGEMM) for k in usable if k != QGEMM], dec) \
        if options.split != "never" and QGEMM.name in pre and usable != [QGEMM] else None
    chosen = shared or split
    if split and shared and options.split == "measured":
        faster = pre.get(shared[2].name, Timing(0.0, 0.0)).ms >= SPLIT_GAIN * pre[QGEMM.name].ms
        chosen = split if faster and split[0] < shared[0] else shared
    assert chosen is not None
    timed = [(vis[k.name].ms, k, k) for k in options.vision if k.name in vis]
    vision = pick(timed, vis)[1] if timed else chosen[1]
    return chosen[1], chosen[2], vision


def _near_best(plans: list[tuple[float, Kernel, Kernel]]) -> list[tuple[float, Kernel, Kernel]]:
    """The plans whose cost is within MARGIN of the cheapest."""
    cheapest = min(cost for cost, _, _ in plans)
    return [plan for plan in plans if plan[0] <= cheapest * (1 + MARGIN)]


def _plan(decode: Kernel, prefill: Kernel, vision: Kernel, chosen_by: str) -> CpuKernels:
    return CpuKernels(vision=vision.name, decode=decode.name, prefill=prefill.name, chosen_by=chosen_by)


def table_block_size(plan: CpuKernels, block_size: int | None) -> int:
    """The block size of the tied embedding / lm_head table (always MatMulNBits): the decode kernel's, or
    for a QGEMM decoder the fastest MatMulNBits block measured at decode."""
    decode = Kernel.parse(plan.decode)
    if decode.op == "nbits":
        return decode.block_size
    measured = [(ms["decode"], Kernel.parse(name).block_size) for name, ms in plan.probe_ms.items()
                if name.startswith("nbits") and "decode" in ms]
    return min(measured)[1] if measured else block_size or DEFAULT_BLOCK_SIZE


# --- measuring ------------------------------------------------------------------------------------------


ROUNDS = 4  # every candidate is timed once per round, so a burst of other work slows all of them alike


def measure(kernels: list[Kernel], decoder: Probe, vision: Probe, threads: int | None = None,
            say: Callable[[str], None] | None = None) -> dict[str, dict[str, Timing]]:
    """Time each kernel on the decoder probe (prefill rows, and one row with the weights read from memory)
    and on the vision probe: the best of ROUNDS interleaved rounds."""
    phases = {"decoder": {"prefill": decoder.tokens, "decode": 1}, "vision": {"vision": vision.tokens}}
    runs: dict[tuple[str, str], _Probed] = {}
    for seed, (name, probe) in enumerate((("decoder", decoder), ("vision", vision))):
        weights = _probe_weights(probe, seed)
        for kernel in kernels:
            runs[kernel.name, name] = _Probed(kernel, probe, weights, phases[name], threads)
        del weights
    scratch = np.zeros(_cache_bytes() // 4, dtype=np.float32)
    for _ in range(ROUNDS):
        for run in runs.values():
            for phase in run.feeds:
                for _ in range(3 if phase == "decode" else 1):
                    if phase == "decode":
                        scratch += 1.0  # evict the caches: a decode step reads its weights from memory
                    run.time(phase)
    result: dict[str, dict[str, Timing]] = {"prefill": {}, "decode": {}, "vision": {}}
    for (kernel_name, _), run in runs.items():
        for phase, best in run.best.items():
            result[phase][kernel_name] = Timing(1000 * best, run.error)
    for kernel in kernels if say else []:
        assert say is not None
        say(f"  {kernel.name}: " + ", ".join(f"{phase} {by[kernel.name].ms:.2f}" for phase, by in result.items())
            + " ms per layer")
    return result


class _Probed:
    """One probe on one kernel: its session, inputs per phase, error against float and best times."""

    def __init__(self, kernel: Kernel, probe: Probe, weights: list[np.ndarray], rows: dict[str, int],
                 threads: int | None):
        self.session = _probe_session(kernel, probe, weights, threads)
        rng = np.random.default_rng(2)
        widths = sorted({k for k, _ in probe.shapes})
        self.feeds = {phase: {f"x{k}": rng.standard_normal((m, k), dtype=np.float32) for k in widths}
                      for phase, m in rows.items()}
        self.best = {phase: float("inf") for phase in rows}
        self.error = 0.0
        for feeds in self.feeds.values():  # warm-up, and the error of the first rows against float
            outputs = self.session.run(None, feeds)
            for y, (k, _), w in zip(outputs, probe.shapes, weights):
                exact = feeds[f"x{k}"][:16] @ w.T
                self.error = max(self.error, float(np.linalg.norm(y[:16] - exact) / np.linalg.norm(exact)))

    def time(self, phase: str) -> None:
        started = time.perf_counter()
        self.session.run(None, self.feeds[phase])
        self.best[phase] = min(self.best[phase], time.perf_counter() - started)


def _probe_weights(probe: Probe, seed: int) -> list[np.ndarray]:
    """Random [N, K] float weights, one per product (the values do not change the kernels' speed)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, k), dtype=np.float32) * np.float32(k**-0.5) for k, n in probe.shapes]


def _probe_session(kernel: Kernel, probe: Probe, weights: list[np.ndarray], threads: int | None) -> Any:
    """An onnxruntime session computing every product of the probe on `kernel`, with the runtime's options."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ..runtime.sessions import session_options

    nodes, initializers = [], []
    for i, ((k, n), weight) in enumerate(zip(probe.shapes, weights)):
        quantized, scales = kernel.arrays(weight)
        initializers += [numpy_helper.from_array(quantized, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
        op_type, attributes = kernel.operator(k, n, CPU_ACCURACY_LEVEL)
        nodes.append(helper.make_node(op_type, [f"x{k}", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      **attributes))
    widths = sorted({k for k, _ in probe.shapes})
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["m", k]) for k in widths],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]) for i, (_, n) in enumerate(probe.shapes)],
        initializer=initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def _cache_bytes() -> int:
    """Twice the last-level cache (at least 64 MB): what one pass must touch to evict it."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        size = int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    except (OSError, ValueError):
        size = 0
    return max(2 * size, 64 * 2**20)


def physical_memory() -> int:
    """Bytes of memory this machine has (0 where unknown, which allows no prefill graph)."""
    found = system.memory()
    return found.total if found else 0


def cpu_name() -> str:
    """The CPU's model name and the cores this process may use."""
    return f"{system.cpu_name()}, {system.cpu_count()} cores"

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
- vision: the fastest kernel at the image's tokens (the vision encoder only ever runs compute-bound);
- batched decode: with a prefill graph, decode steps of at least `batch_decode_from` rows run on it too,
  where its kernel measured faster than the decoder's at those rows (BATCH_ROWS) and every larger count.

Every candidate is also checked on the model's own activations (`check`: export/linear.py's plan of each
site, measured on calibration rows with the real weights): a kernel that cannot keep every site within
linear.ERROR_BOUND without computing some of them in float (a kernel that saturates, say) is only chosen
when no candidate can. Users narrow the choice (`kernels`, `block_size`); decoders too small to time
meaningfully keep the defaults unless `always_measure`. The result, with every candidate's timings and
errors, is recorded in the manifest (`CpuKernels`) and shown by `palionnx bench` and `palionnx info`.
Never imports torch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import system
from ..runtime.defaults import DEFAULT_BLOCK_SIZE
from ..runtime.manifest import CpuKernels
from .linear import ERROR_BOUND, LinearInput, SitePlan
from .options import KERNEL_CHOICES
from .quantize import BITS, CPU_ACCURACY_LEVEL, OPSET, QGEMM, Kernel

PROMPT_TEXT_TOKENS = 4  # <bos>, a short prompt and "\n" after the image tokens: the prefill probe's rows
CAPTION_TOKENS = 64  # decode steps per caption, when weighing decode against prefill
MARGIN = 0.10  # a coarser kernel (larger error) or a second graph only when it is this much faster
MAX_SPLIT_MEMORY = 0.25  # ... and only where its weights take at most this share of the machine's memory
SPLIT_GAIN = 1.3  # a second (int8) prefill graph costs memory: only for at least this prefill speed-up
MIN_MEASURED_PARAMS = 50_000_000  # smaller decoders keep the defaults: their products time overheads
BLOCK_SIZES = {"int4": (32, 64, 128), "int8": (32, 64, 128, 256)}  # int4 beyond 128 loses too much accuracy
BATCH_ROWS = (2, 4, 8, 16, 32)  # decode steps of this many rows are timed too (batched decode)


@dataclass(frozen=True)
class Probe:
    """One layer's matrix products at real shapes, run at `tokens` rows: per input, its width K and the
    output widths N of the products reading it (as the layer's graph shares its inputs)."""

    inputs: tuple[tuple[int, tuple[int, ...]], ...]
    tokens: int

    @property
    def params(self) -> int:
        return sum(k * n for k, outputs in self.inputs for n in outputs)


def decoder_probe(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                  prompt_tokens: int) -> Probe:
    """A decoder layer: packed QKV, o_proj, gate and up, down."""
    attention = heads * head_dim
    qkv = attention + 2 * kv_heads * head_dim
    return Probe(((hidden, (qkv,)), (attention, (hidden,)), (hidden, (intermediate, intermediate)),
                  (intermediate, (hidden,))), prompt_tokens)


def vision_probe(hidden: int, intermediate: int, image_tokens: int) -> Probe:
    """A SigLIP layer: q, k and v, o, fc1, fc2."""
    return Probe(((hidden, (hidden,) * 3), (hidden, (hidden,)), (hidden, (intermediate,)), (intermediate, (hidden,))),
                 image_tokens)


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


Measure = Callable[[list[Kernel]], dict[str, dict[str, float]]]  # kernels -> {phase: {kernel name: ms}}
Check = Callable[[str, Kernel], dict[str, SitePlan]]  # ("vision" | "decoder", kernel) -> each site's plan


def choose(level: str, hidden: int, decoder_params: int, kernels: str = "auto", block_size: int | None = None,
           measure: Measure | None = None, split_bytes: int = 0, check: Check | None = None,
           always_measure: bool = False) -> CpuKernels:
    """The folder's kernels, and with `check` how each site of each graph is fed to them.

    When there is a choice left and the decoder is big enough (or `always_measure`), `measure(kernels)`
    times the candidates ({"decode" | "prefill" | "vision" | "batchM": {kernel name: ms}}); otherwise the
    first candidate of each (MatMulNBits at the default block size unless the user said otherwise). A
    prefill graph whose memory (`split_bytes`) would exceed MAX_SPLIT_MEMORY of this machine's is not
    measured."""
    options = allowed(level, hidden, kernels, block_size)
    if options.split == "measured" and not prefill_graph_fits(split_bytes, physical_memory()):
        options = dataclasses.replace(options, split="never")  # the vision encoder may still use QGEMM
    plans: dict[tuple[str, str], dict[str, SitePlan]] = {}

    def sites(graph: str, kernel: Kernel) -> dict[str, SitePlan]:
        if check is None:
            return {}
        if (graph, kernel.name) not in plans:
            plans[graph, kernel.name] = check(graph, kernel)
        return plans[graph, kernel.name]

    measured = not options.fixed and measure is not None and (always_measure or decoder_params >= MIN_MEASURED_PARAMS)
    if not measured:
        decode = next((k for k in options.decode if k.block_size in (0, block_size or DEFAULT_BLOCK_SIZE)),
                      options.decode[0])
        vision = next((k for k in options.vision if k.name == decode.name), options.vision[0])
        by = "user" if kernels != "auto" or block_size else "default"
        plan = _plan(decode, QGEMM if options.split == "always" else decode, vision, by)
    else:
        assert measure is not None
        timings = measure(options.kernels)
        plan = _plan(*_cheapest(options, _safe(options, timings, sites)), "measurement")
        plan.cpu = cpu_name()
        names = {name for by in timings.values() for name in by}
        plan.probe_ms = {name: {phase: round(by[name], 3) for phase, by in timings.items() if name in by}
                         for name in sorted(names)}
        plan.batch_decode_from = batch_decode_from(plan, timings)
    if check is not None:
        roles = {"vision_encoder": ("vision", plan.vision), "decoder": ("decoder", plan.decode)}
        if plan.prefill != plan.decode:
            roles["decoder_prefill"] = ("decoder", plan.prefill)
        plan.sites = {role: {site: p.to_json() for site, p in sites(graph, Kernel.parse(name)).items()}
                      for role, (graph, name) in roles.items()}
        plan.error_bound = ERROR_BOUND
        plan.probe_error = {name: round(max((p.plain_error for p in by.values()), default=0.0), 4)
                            for (_, name), by in sorted(plans.items())}
    return plan


def _safe(options: Allowed, timings: dict[str, dict[str, float]], sites: Check) -> dict[str, dict[str, float]]:
    """The timings of the candidates that keep every site of their graph quantized (none left for a phase:
    all of them, the fastest then computing some sites in float). Checked lazily: the cheapest choice first,
    a kernel that fails dropped from its phase, until the choice holds."""
    graph_of = {"decode": "decoder", "prefill": "decoder", "vision": "vision"}
    usable = {phase: dict(timings[phase]) for phase in graph_of}
    exhausted: set[str] = set()  # phases where no candidate holds
    while True:
        chosen = dict(zip(("decode", "prefill", "vision"), _cheapest(options, usable)))
        failing = [(phase, kernel) for phase, kernel in chosen.items() if phase not in exhausted
                   and any(p.float_compute for p in sites(graph_of[phase], kernel).values())]
        if not failing:
            return usable
        for phase, kernel in failing:
            if usable[phase].pop(kernel.name, None) is None or not usable[phase]:  # nothing left that holds
                usable[phase] = dict(timings[phase])
                exhausted.add(phase)


def batch_decode_from(plan: CpuKernels, timings: dict[str, dict[str, float]]) -> int:
    """With a prefill graph: the fewest rows from which its kernel decodes MARGIN faster than the decoder's
    (the margin pays for its per-row quantization nodes, which the probe's products leave out), at every
    measured row count from there up (0: never)."""
    if plan.prefill == plan.decode:
        return 0
    start = 0
    for rows in BATCH_ROWS:
        by = timings.get(f"batch{rows}", {})
        faster = plan.prefill in by and plan.decode in by and by[plan.prefill] * (1 + MARGIN) < by[plan.decode]
        start = (start or rows) if faster else 0
    return start


def _cheapest(options: Allowed, times: dict[str, dict[str, float]]) -> tuple[Kernel, Kernel, Kernel]:
    """(decode, prefill, vision) kernels. A plan's cost is a caption's: CAPTION_TOKENS decode steps plus the
    prefill, on the decode graph (shared) or on a QGEMM prefill graph (split). Among plans within MARGIN of
    the cheapest, the finer block (smaller weight error) wins. The split plan is taken when allowed,
    cheaper, and its prefill SPLIT_GAIN times faster than the shared plan's; the vision kernel likewise by
    its time."""
    dec, pre, vis = times["decode"], times["prefill"], times["vision"]
    usable = [k for k in options.decode if k.name in dec and k.name in pre] or options.decode[:1]

    def cost(decode: Kernel, prefill: Kernel) -> float:
        return CAPTION_TOKENS * dec.get(decode.name, 0.0) + pre.get(prefill.name, 1e9)

    def pick(plans: list[tuple[float, Kernel, Kernel]]) -> tuple[float, Kernel, Kernel]:
        return min(_near_best(plans), key=lambda p: (_weight_error(p[1]), p[0]))

    shared = pick([(cost(k, k), k, k) for k in usable]) if options.split != "always" else None
    split = pick([(cost(k, QGEMM), k, QGEMM) for k in usable if k != QGEMM]) \
        if options.split != "never" and QGEMM.name in pre and usable != [QGEMM] else None
    chosen = shared or split
    if split and shared and options.split == "measured":
        faster = pre.get(shared[2].name, 0.0) >= SPLIT_GAIN * pre[QGEMM.name]
        chosen = split if faster and split[0] < shared[0] else shared
    assert chosen is not None
    timed = [(vis[k.name], k, k) for k in options.vision if k.name in vis]
    vision = pick(timed)[1] if timed else chosen[1]
    return chosen[1], chosen[2], vision


def _weight_error(kernel: Kernel) -> tuple[int, int]:
    """Orders kernels by how finely they store weights: more bits first, then smaller blocks (QGEMM's
    per-column int8 counts as 8 bits in blocks of the whole row)."""
    return (-kernel.bits, kernel.block_size or 1 << 30)


def _near_best(plans: list[tuple[float, Kernel, Kernel]]) -> list[tuple[float, Kernel, Kernel]]:
    """The plans whose cost is within MARGIN of the cheapest."""
    cheapest = min(cost for cost, _, _ in plans)
    return [plan for plan in plans if plan[0] <= cheapest * (1 + MARGIN)]


def _plan(decode: Kernel, prefill: Kernel, vision: Kernel, chosen_by: str) -> CpuKernels:
    return CpuKernels(vision=vision.name, decode=decode.name, prefill=prefill.name, chosen_by=chosen_by)


def default_plan(kernel: Kernel) -> CpuKernels:
    """`kernel` for every graph, not measured (a CUDA folder's MatMulNBits)."""
    return _plan(kernel, kernel, kernel, "default")


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
            say: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Time each kernel on the decoder probe (prefill rows; one row and BATCH_ROWS rows with the weights read
    from memory) and on the vision probe: the best ms of ROUNDS interleaved rounds."""
    batches = {f"batch{rows}": rows for rows in BATCH_ROWS}
    phases = {"decoder": {"prefill": decoder.tokens, "decode": 1, **batches}, "vision": {"vision": vision.tokens}}
    runs: dict[tuple[str, str], _Probed] = {}
    for seed, (name, probe) in enumerate((("decoder", decoder), ("vision", vision))):
        weights = _probe_weights(probe, seed)
        for kernel in kernels:
            runs[kernel.name, name] = _Probed(kernel, probe, weights, phases[name], threads)
        del weights
    scratch = np.zeros(_cache_bytes() // 4, dtype=np.float32)
    from_memory = {"decode", *batches}
    for _ in range(ROUNDS):
        for run in runs.values():
            for phase in run.feeds:
                for _ in range(3 if phase in from_memory else 1):
                    if phase in from_memory:
                        scratch += 1.0  # evict the caches: a decode step reads its weights from memory
                    run.time(phase)
    result: dict[str, dict[str, float]] = {phase: {} for by in phases.values() for phase in by}
    for (kernel_name, _), run in runs.items():
        for phase, best in run.best.items():
            result[phase][kernel_name] = 1000 * best
    for kernel in kernels if say else []:
        assert say is not None
        say(f"  {kernel.name}: " + ", ".join(f"{phase} {by[kernel.name]:.2f}" for phase, by in result.items())
            + " ms per layer")
    return result


class _Probed:
    """One probe on one kernel: its session, inputs per phase and best times."""

    def __init__(self, kernel: Kernel, probe: Probe, weights: list[list[np.ndarray]], rows: dict[str, int],
                 threads: int | None):
        self.session = _probe_session(kernel, probe, weights, threads)
        rng = np.random.default_rng(2)
        self.feeds = {phase: {f"x{i}": rng.standard_normal((m, k), dtype=np.float32)
                              for i, (k, _) in enumerate(probe.inputs)} for phase, m in rows.items()}
        self.best = {phase: float("inf") for phase in rows}
        for feeds in self.feeds.values():  # warm-up
            self.session.run(None, feeds)

    def time(self, phase: str) -> None:
        started = time.perf_counter()
        self.session.run(None, self.feeds[phase])
        self.best[phase] = min(self.best[phase], time.perf_counter() - started)


def _probe_weights(probe: Probe, seed: int) -> list[list[np.ndarray]]:
    """Random [N, K] float weights per input and product (the values do not change the kernels' speed)."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((n, k), dtype=np.float32) * np.float32(k**-0.5) for n in outputs]
            for k, outputs in probe.inputs]


def _probe_session(kernel: Kernel, probe: Probe, weights: list[list[np.ndarray]], threads: int | None) -> Any:
    """An onnxruntime session computing every product of the probe on `kernel` as a folder's graph would
    (export/linear.py), with the runtime's options."""
    import onnxruntime as ort

    from ..runtime.sessions import session_options
    from .onnx_builder import GraphBuilder, Weights

    g = GraphBuilder(Weights())
    outputs = 0
    for i, ((k, widths), products) in enumerate(zip(probe.inputs, weights)):
        g.input(f"x{i}", np.float32, ["m", k])
        site = LinearInput(g, f"x{i}", k, kernel, SitePlan(), CPU_ACCURACY_LEVEL, f"x{i}")
        for n, weight in zip(widths, products):
            name = f"y{outputs}"

            def quantized(chosen: Kernel, name: str = name, weight: np.ndarray = weight) -> tuple[str, str]:
                packed, scales = chosen.arrays(weight)
                return g.weight(f"{name}.w", lambda: packed), g.weight(f"{name}.s", lambda: scales)

            site.product(quantized, lambda: np.zeros(0), n, name, name, output=name)
            g.output(name, np.float32, ["m", n])
            outputs += 1
    return ort.InferenceSession(g.model("probe", OPSET).SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def _cache_bytes() -> int:
    """Twice the last-level cache (at least 64 MB): what one pass must touch to evict it."""
    return max(2 * (system.last_level_cache_bytes() or 0), 64 * 2**20)


def prefill_graph_bytes(level: str, layer_params: float, table: float) -> float:
    """The weights of a prefill graph: int8 copies of the layers' `layer_params` and its own prepacked copy of
    the lm_head `table` (vocab x hidden) at the level's bits."""
    return layer_params + table * BITS[level] / 8


def prefill_graph_fits(split_bytes: float, memory: float) -> bool:
    """Whether a prefill graph of `split_bytes` may be built for a machine of `memory` bytes."""
    return split_bytes <= MAX_SPLIT_MEMORY * memory


def physical_memory() -> int:
    """Bytes of memory this machine has (0 where unknown, which allows no prefill graph)."""
    found = system.memory()
    return found.total if found else 0


def cpu_name() -> str:
    """The CPU's model name and the cores this process may use."""
    return f"{system.cpu_name()}, {system.cpu_count()} cores"

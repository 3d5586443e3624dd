"""One linear layer's input on the CPU: how its int8 activations are kept accurate, and the nodes that do it.

Both CPU kernels quantize activations to 8 bits at run time: MatMulNBits (accuracy_level 4) per row and
block of K, int8 QGEMM (`quantize.QGEMM`) per row (`quantize_rows`). A few input channels far larger than
the rest (real checkpoints have them after their norms and in their MLPs) set those scales and round every
other channel of the row or block to nothing. For each input ("site": the tensor one or more linear layers
read) the export measures, on calibration rows of that tensor and with the layers' real weights, how much
error the kernel's activation quantization adds, and keeps it within ERROR_BOUND:

- the input as it is, when it stays within the bound;
- else the LLM.int8 decomposition: the fewest of its largest channels (by calibration peak, at most
  1/OUTLIER_SHARE of K) are zeroed in the kernel's input and multiplied by their float weights beside it
  (`Mul` by a 0/1 mask, `Gather`, `MatMul`, `Add`). The same split is taken where it cuts the whole
  product's error well below the kernel's alone: the weights reading an outlier channel are as many times
  smaller, and int4's blocks round them away (WEIGHT_SLACK);
- else the layers compute with float activations (MatMulNBits accuracy_level 0).

`SitePlan` is that choice; `LinearInput` writes it into a graph, making the masked, gathered and quantized
forms of an input once for every layer that reads it; `plan_site` measures and chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .quantize import Kernel

ERROR_BOUND = 0.02  # relative error the activation quantization may add to a layer's output (calibration rows)
OUTLIER_SHARE = 32  # at most K / OUTLIER_SHARE input channels go to the float side product
SAMPLED_OUTPUTS = 256  # output columns of the weights the error is measured on (errors are per column)
# A split that cuts the whole product's error (weights included) beyond this share and this much is taken even
# where the activations alone would hold: it keeps an outlier channel's small weights out of a coarse block.
WEIGHT_SLACK, WEIGHT_FLOOR = 0.25, 0.005
FLOAT_ACCURACY_LEVEL = 0  # MatMulNBits with float activations


@dataclass(frozen=True)
class SitePlan:
    """How one input is fed to its layers: `outliers` (channels multiplied in float beside the kernel),
    `float_compute` (no activation quantization at all), and the measured relative errors the kernel adds
    as built (`error`) and as it would be without the split (`plain_error`)."""

    outliers: tuple[int, ...] = ()
    float_compute: bool = False
    error: float = 0.0
    plain_error: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"outliers": len(self.outliers), "float": self.float_compute, "error": round(self.error, 5),
                "plain_error": round(self.plain_error, 5)}


PLAIN = SitePlan()


class Emitter(Protocol):
    """Where nodes go: `onnx_builder.GraphBuilder`."""

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attributes: Any) -> list[str]: ...

    def weight(self, name: str, make: Callable[[], np.ndarray]) -> str: ...

    def constant(self, name: str, value: Any, dtype: Any) -> str: ...


Quantized = Callable[[Kernel], tuple[str, str]]  # kernel -> (quantized weight, scales) initializer names


class LinearInput:
    """One float32 input `x` of width `k`, read by linear layers on `kernel` as `plan` says."""

    def __init__(self, g: Emitter, x: str, k: int, kernel: Kernel, plan: SitePlan, accuracy_level: int, name: str):
        self.g, self.k, self.kernel, self.plan, self.name = g, k, kernel, plan, name
        self.accuracy_level = FLOAT_ACCURACY_LEVEL if plan.float_compute else accuracy_level
        self.x = x
        self._fed: tuple[str, ...] | None = None

    @property
    def weight_kernel(self) -> Kernel:
        """The kernel the layers' weights are stored for: QGEMM computing in float falls back to MatMulNBits."""
        if self.plan.float_compute and self.kernel.op == "qgemm":
            return Kernel("nbits", self.kernel.bits, 32)
        return self.kernel

    def product(self, quantized: Quantized, side_weight: Callable[[], np.ndarray], n: int, key: str, name: str,
                output: str | None = None) -> str:
        """x @ W.T for one layer of `n` outputs: `quantized(kernel)` names its stored weight and scales,
        `side_weight()` gives the float [N, K] weight the outlier columns are taken from (read only when the
        plan has outliers); `output` names the result (default: from `name`)."""
        g, kernel = self.g, self.weight_kernel
        fed = self._feed()
        packed, scales = quantized(kernel)
        last = {"outputs": [output]} if output and not self.plan.outliers else {}
        if kernel.op == "qgemm":
            y = g.op("MatMulIntegerToFloat", [fed[0], packed, fed[1], scales, fed[2]], name, domain="com.microsoft",
                     **last)[0]
        else:
            op_type, attributes = kernel.operator(self.k, n, self.accuracy_level)
            y = g.op(op_type, [fed[0], packed, scales], name, domain="com.microsoft", **last, **attributes)[0]
        if not self.plan.outliers:
            return y
        columns = list(self.plan.outliers)
        side = g.weight(f"{key}.outliers.{kernel.name}",
                        lambda: np.ascontiguousarray(side_weight()[:, columns].T.astype(np.float32)))
        side_y = g.op("MatMul", [fed[-1], side], f"{name}/outliers")[0]
        return g.op("Add", [y, side_y], f"{name}/with_outliers", outputs=[output] if output else 1)[0]

    def _feed(self) -> tuple[str, ...]:
        """(kernel input, [QGEMM: row scales, zero point], [the outlier channels]), made once."""
        if self._fed is not None:
            return self._fed
        g, name, x = self.g, self.name, self.x
        gathered: list[str] = []
        if self.plan.outliers:
            mask = np.ones(self.k, dtype=np.float32)
            mask[list(self.plan.outliers)] = 0.0
            columns = np.array(self.plan.outliers, dtype=np.int64)
            # named by kernel: graphs sharing a weights file may split different channels of the same input
            kept = f"{name}/{self.weight_kernel.name}"
            gathered = g.op("Gather", [x, g.constant(f"{kept}/outlier_columns", columns, np.int64)],
                            f"{name}/outlier_gather", axis=-1)
            x = g.op("Mul", [x, g.constant(f"{kept}/outlier_mask", mask, np.float32)], f"{name}/outlier_mask")[0]
        if self.weight_kernel.op == "qgemm":
            self._fed = (*quantize_rows(g, x, self.k, name), *gathered)
        else:
            self._fed = (x, *gathered)
        return self._fed


def quantize_rows(g: Emitter, x: str, k: int, name: str) -> tuple[str, str, str]:
    """x float32 [..., K] -> (uint8 [..., K], float32 scales [..., 1], the zero point): symmetric, one scale per
    row (max |x| / 127), stored as uint8 around 128 (MLAS's fast integer GEMMs take unsigned activations;
    its int8 x int8 path is far slower on CPUs without AVX-VNNI-INT8). The input of MatMulIntegerToFloat."""
    peak = g.op("ReduceMax", [g.op("Abs", [x], f"{name}/abs")[0], g.constant(f"{name}/last_axis", [-1], np.int64)],
                f"{name}/row_peak", keepdims=1)[0]
    scale = g.op("Mul", [peak, g.constant(f"{name}/inv127", 1 / 127, np.float32)], f"{name}/row_scale")[0]
    scale = g.op("Max", [scale, g.constant(f"{name}/tiny", 1e-30, np.float32)], f"{name}/row_scale_safe")[0]
    # QuantizeLinear wants a zero point of the scale's shape: 128 per row, made from the scale
    centre = g.op("Mul", [scale, g.constant(f"{name}/zero", 0.0, np.float32)], f"{name}/zp_zero")[0]
    centre = g.op("Add", [centre, g.constant(f"{name}/centre", 128.0, np.float32)], f"{name}/zp_float")[0]
    zero_points = g.op("Cast", [centre], f"{name}/zero_points", to=2)[0]  # TensorProto.UINT8
    quantized = g.op("QuantizeLinear", [x, scale, zero_points], f"{name}/quantize", axis=-1, block_size=k)[0]
    return quantized, scale, g.constant(f"{name}/zero_point", 128, np.uint8)


def dequantize(kernel: Kernel, quantized: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The float [N, K] weight a kernel's stored arrays (`Kernel.arrays`) stand for."""
    if kernel.op == "qgemm":  # int8 [K, N], scales [N]
        return (quantized.astype(np.float32) * scales[None, :]).T
    n, blocks, _ = quantized.shape
    if kernel.bits == 4:  # two values a byte, the first in the low nibble
        values = np.stack([quantized & 0x0F, quantized >> 4], axis=-1).reshape(n, blocks, -1)
    else:
        values = quantized
    centred = values.astype(np.float32) - 2 ** (kernel.bits - 1)
    return (centred * scales[:, :, None]).reshape(n, -1)[:, :k]


def sample_outputs(weight: np.ndarray) -> np.ndarray:
    """SAMPLED_OUTPUTS rows of a [N, K] weight, spread evenly (a product's error is per output column, so
    these measure it as well as all of them)."""
    picked = np.unique(np.linspace(0, weight.shape[0] - 1, min(SAMPLED_OUTPUTS, weight.shape[0])).round().astype(int))
    return np.ascontiguousarray(weight[picked], dtype=np.float32)


def plan_site(rows: np.ndarray, peaks: np.ndarray, weight: np.ndarray, kernel: Kernel, accuracy_level: int,
              bound: float | None = None) -> SitePlan:
    """The cheapest way to feed calibration `rows` [R, K] (channel peaks `peaks` [K]) on `kernel` to layers of
    float weight `weight` [N, K] (or `sample_outputs` of it): the fewest of its largest channels split off
    (none, 1, 2, 4, ... up to K / OUTLIER_SHARE) such that the activation error stays within `bound` (default
    ERROR_BOUND) and the whole product's error against float is within WEIGHT_SLACK of the best count's (an
    outlier channel's weights are that much smaller, and a coarse weight block rounds them away: int4
    loses them even where its activations hold); in float when no count holds the bound."""
    bound = ERROR_BOUND if bound is None else bound
    k = rows.shape[1]
    quantized, scales = kernel.arrays(weight)
    exact_weight = dequantize(kernel, quantized, scales, k)
    order = np.argsort(-peaks, kind="stable")
    counts = [0] + [2**i for i in range(int(np.log2(max(1, k // OUTLIER_SHARE))) + 1)]
    variants = []
    for count in counts:
        masked = rows.copy()
        masked[:, order[:count]] = 0.0
        variants.append(masked)
    got = _run_kernel(np.concatenate(variants), quantized, scales, kernel, accuracy_level, weight.shape[0])
    exact = rows @ weight.T
    scale = max(float(np.linalg.norm(exact)), 1e-30)
    activation, total = [], []
    for i, (count, masked) in enumerate(zip(counts, variants)):
        main = masked @ exact_weight.T
        side = rows[:, order[:count]] @ weight[:, order[:count]].T
        kernel_out = got[i * len(rows) : (i + 1) * len(rows)]
        activation.append(float(np.linalg.norm(kernel_out - main)) / max(float(np.linalg.norm(main + side)), 1e-30))
        total.append(float(np.linalg.norm(kernel_out + side - exact)) / scale)
    held = [i for i, error in enumerate(activation) if error <= bound]
    if not held:
        return SitePlan(float_compute=True, plain_error=activation[0])
    best = min(total[i] for i in held)
    i = next(i for i in held if total[i] <= max(best * (1 + WEIGHT_SLACK), best + WEIGHT_FLOOR))
    return SitePlan(tuple(sorted(order[: counts[i]].tolist())), error=activation[i], plain_error=activation[0])


def _run_kernel(x: np.ndarray, quantized: np.ndarray, scales: np.ndarray, kernel: Kernel, accuracy_level: int,
                n: int) -> np.ndarray:
    """x @ W.T on `kernel` in onnxruntime, W given by its stored arrays."""
    import onnxruntime as ort

    from ..runtime.sessions import session_options
    from .onnx_builder import GraphBuilder, Weights
    from .quantize import OPSET

    g = GraphBuilder(Weights())
    k = x.shape[1]
    g.input("x", np.float32, ["rows", k])
    site = LinearInput(g, "x", k, kernel, PLAIN, accuracy_level, "probe")
    y = site.product(lambda _: (g.weight("w", lambda: quantized), g.weight("s", lambda: scales)),
                     lambda: np.zeros(0), n, "probe", "probe/product")
    g.op("Identity", [y], "out", outputs=["y"])
    g.output("y", np.float32, ["rows", n])
    session = ort.InferenceSession(g.model("probe", OPSET).SerializeToString(), session_options(None),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]

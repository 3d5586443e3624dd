"""Activation outliers: function-preserving stress variants of the trained model, and int8 activations that
survive them (export/linear.py: outlier channels split off per input, chosen on calibration rows).

The stressed checkpoint is the trained shapes-pg1 with real-style outliers: gain x512 on 8 of the 256
channels of every pre-linear norm (3 %), the same share of the MLP intermediate channels of every layer, the
vision tower too. In exact arithmetic it is the same model; per-tensor int8 activations (what palionnx used before)
fall from 95 % to 27-42 % exact match on it.
"""

from pathlib import Path

import numpy as np
import pytest

from palionnx import Captioner
from palionnx.export import linear
from palionnx.export.calibrate import spiky_channels
from palionnx.export.quantize import QGEMM, Kernel
from palionnx.runtime.manifest import Manifest
from palionnx.samples import sample_images
from palionnx.testmodels.evaluation import evaluate
from palionnx.testmodels.stress import Stress, stress_checkpoint

SCENES = 100
# Measured on the AMD EPYC VM over 300 held-out scenes (benchmarks/trained_quality.py --stress a512c8):
# fp32 and every int8/int4 default within 1.5 points of it. Asserted here on 100 scenes with a 3-point margin.
MARGIN = 0.03
STRESS = Stress.parse("a512c8")


@pytest.fixture(scope="module")
def stressed(shapes_pg1, tmp_path_factory):
    """stressed(spec) -> the stressed shapes-pg1 checkpoint folder, written on first use."""
    root = tmp_path_factory.mktemp("stressed")
    cache: dict[str, Path] = {}

    def get(spec: str = STRESS.name) -> Path:
        if spec not in cache:
            cache[spec] = stress_checkpoint(shapes_pg1, root / spec, Stress.parse(spec), spiky_channels)
        return cache[spec]

    return get


@pytest.fixture(scope="module")
def base_report(shapes_exported):
    return evaluate(Captioner.load(shapes_exported("fp32"), device="cpu"), count=SCENES, batch_size=16)


def _export(checkpoint: Path, folder: Path, quant: str, kernels: str = "auto") -> Captioner:
    from palionnx.export.convert import export

    export(checkpoint, folder, quant=quant, device="cpu", kernels=kernels)
    return Captioner.load(folder, device="cpu")


def test_stress_preserves_the_function(stressed, base_report, tmp_path):
    report = evaluate(_export(stressed(), tmp_path / "fp32", "fp32"), count=SCENES, batch_size=16)
    assert [s.caption for s in report.scenes] == [s.caption for s in base_report.scenes]


@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
def test_stress_preserves_the_logits_of_both_families(family, checkpoints, exported, tmp_path):
    """Gemma and Gemma 2 (whose post-sublayer norms are left alone), vision and spikes included: the fp32
    exports of the stressed checkpoint give the base model's prefill logits."""
    from palionnx.export.convert import export

    stressed = stress_checkpoint(checkpoints[family], tmp_path / "ckpt", Stress.parse("a512c8s1"), spiky_channels)
    export(stressed, tmp_path / "fp32", quant="fp32")
    images, prompts = sample_images(4, 28), ["caption en"] * 4
    base = Captioner.load(exported(family, "fp32"), device="cpu").prefill_logits(images, prompts)
    got = Captioner.load(tmp_path / "fp32", device="cpu").prefill_logits(images, prompts)
    np.testing.assert_allclose(got, base, rtol=1e-3, atol=1e-3 * np.abs(base).max())


@pytest.mark.parametrize("quant,kernels", [("int8", "auto"), ("int4", "qgemm")])
def test_int8_activations_hold_on_outliers(stressed, base_report, tmp_path, quant, kernels):
    captioner = _export(stressed(), tmp_path / quant, quant, kernels)
    report = evaluate(captioner, count=SCENES, batch_size=16)
    assert report.exact_match >= base_report.exact_match - MARGIN, report.summary()
    cpu = captioner.manifest.quant.cpu_kernels
    assert cpu.calibration and cpu.error_bound == linear.ERROR_BOUND
    # every norm-fed input (qkv, mlp) and the MLP intermediate of every layer, and the vision tower's, are split
    for role in ("decoder", "vision_encoder") + (("decoder_prefill",) if kernels == "qgemm" else ()):
        sites = cpu.sites[role]
        assert all(plan["error"] <= linear.ERROR_BOUND and not plan["float"] for plan in sites.values())
        assert cpu.site_counts(role)["split"] >= (3 * 4 if role != "vision_encoder" else 5)
    assert max(s["channel_ratio"] for s in cpu.activations["decoder"].values()) > 100


def test_without_the_split_int8_activations_collapse(stressed, base_report, tmp_path, monkeypatch):
    """What the split buys: the same export with any error allowed (no split anywhere) loses most captions."""
    monkeypatch.setattr(linear, "ERROR_BOUND", float("inf"))
    monkeypatch.setattr(linear, "WEIGHT_SLACK", float("inf"))
    captioner = _export(stressed(), tmp_path / "int4", "int4", "qgemm")
    assert captioner.manifest.quant.cpu_kernels.site_counts("decoder")["split"] == 0
    report = evaluate(captioner, count=SCENES, batch_size=16)
    assert report.exact_match < base_report.exact_match - 0.2, report.summary()


def test_spikes_are_token_specific_and_held(stressed, base_report, tmp_path):
    """Spike stress: a few MLP channels per layer that fire on few tokens, x512: huge on those tokens only."""
    captioner = _export(stressed("a512c0s2-text"), tmp_path / "int8", "int8")
    activations = captioner.manifest.quant.cpu_kernels.activations["decoder"]
    for layer in range(captioner.manifest.layers):
        down = activations[f"layers.{layer}.down"]
        assert 0 < down["spike_tokens"] < down["tokens"] / 4 and down["channel_ratio"] > 100
    assert max(s["channel_ratio"] for s in captioner.manifest.quant.cpu_kernels.activations["vision"].values()) < 100
    report = evaluate(captioner, count=SCENES, batch_size=16)
    assert report.exact_match >= base_report.exact_match - MARGIN, report.summary()


def test_stress_names():
    assert Stress.parse("a512c8") == Stress(512.0, 8)
    assert Stress.parse("a128c2s2-text") == Stress(128.0, 2, vision=False, spikes=2)
    assert Stress(32.0, 4, vision=False).name == "a32c4-text"
    with pytest.raises(ValueError, match="unknown stress"):
        Stress.parse("x512")


# --- one input, measured ------------------------------------------------------------------------------


def _planted(rng, outliers: list[int], alpha: float = 512.0):
    """Calibration rows with `outliers` channels alpha times the rest, and a weight that undoes it (as the
    stress does): the product is what it is without them."""
    rows = rng.standard_normal((128, 256)).astype(np.float32)
    weight = rng.standard_normal((300, 256)).astype(np.float32) / 16
    rows[:, outliers] *= alpha
    weight[:, outliers] /= alpha
    return rows, weight


@pytest.mark.parametrize("kernel", [Kernel("nbits", 4, 32), Kernel("nbits", 8, 64), QGEMM], ids=lambda k: k.name)
def test_plan_site_splits_off_exactly_the_planted_outliers(kernel):
    rng = np.random.default_rng(0)
    rows, weight = _planted(rng, [3, 70, 150, 200])
    sampled = linear.sample_outputs(weight)
    assert sampled.shape == (linear.SAMPLED_OUTPUTS, 256)
    plan = linear.plan_site(rows, np.abs(rows).max(0), sampled, kernel, 4)
    assert plan.outliers == (3, 70, 150, 200) and not plan.float_compute
    assert plan.error <= linear.ERROR_BOUND < 0.3 < plan.plain_error
    rows, weight = _planted(rng, [])
    clean = linear.plan_site(rows, np.abs(rows).max(0), linear.sample_outputs(weight), kernel, 4)
    assert clean.outliers == () and clean.error == clean.plain_error < linear.ERROR_BOUND
    # more outliers than K / OUTLIER_SHARE: nothing quantized holds, so the input is fed in float
    many = list(range(0, 256, 16))
    rows, weight = _planted(rng, many, alpha=1e4)
    plan = linear.plan_site(rows, np.abs(rows).max(0), linear.sample_outputs(weight), kernel, 4)
    assert plan.float_compute and plan.outliers == ()


@pytest.mark.parametrize("kernel", [Kernel("nbits", 4, 32), Kernel("nbits", 8, 128), QGEMM], ids=lambda k: k.name)
def test_dequantize_is_what_the_kernel_multiplies_by(kernel):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    rows = rng.standard_normal((8, 256)).astype(np.float32)
    quantized, scales = kernel.arrays(weight)
    dense = linear.dequantize(kernel, quantized, scales, 256)
    assert np.abs(dense - weight).max() <= np.abs(weight).max() / (7 if kernel.bits == 4 else 127)
    if kernel.op == "nbits":  # float activations: the kernel's product is the dequantized weight's exactly
        got = linear._run_kernel(rows, quantized, scales, kernel, linear.FLOAT_ACCURACY_LEVEL, 64)
        np.testing.assert_allclose(got, rows @ dense.T, rtol=1e-4, atol=1e-4)


def test_split_graph_computes_the_float_product():
    """A LinearInput with a split: the kernel's product of the other channels plus the float product of the
    outliers, in one graph (the nodes every folder gets)."""
    import onnxruntime as ort

    from palionnx.export.onnx_builder import GraphBuilder, Weights

    rng = np.random.default_rng(2)
    rows, weight = _planted(rng, [5, 9])
    for kernel in (Kernel("nbits", 8, 32), QGEMM):
        g = GraphBuilder(Weights())
        g.input("x", np.float32, ["rows", 256])
        site = linear.LinearInput(g, "x", 256, kernel, linear.SitePlan((5, 9)), 4, "x")
        quantized, scales = kernel.arrays(weight)

        def stored(_, g=g, q=quantized, s=scales):
            return g.weight("w", lambda: q), g.weight("s", lambda: s)

        site.product(stored, lambda: weight, 300, "w", "product", output="y")
        g.output("y", np.float32, ["rows", 300])
        session = ort.InferenceSession(g.model("t", 21).SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": rows})[0]
        exact = rows @ weight.T
        assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02
        ops = {n.name: n.op_type for n in g.nodes}
        assert ops["x/outlier_gather"] == "Gather" and ops["x/outlier_mask"] == "Mul"
        assert ops["product/outliers"] == "MatMul" and ops["product/with_outliers"] == "Add"


def test_a_cpu_int8_folder_of_an_unstressed_model_splits_nothing(exported):
    cpu = Manifest.load(exported("tiny-pg1", "int8")).quant.cpu_kernels
    assert cpu.sites and all(cpu.site_counts(role)["split"] == cpu.site_counts(role)["float"] == 0
                             for role in cpu.sites)

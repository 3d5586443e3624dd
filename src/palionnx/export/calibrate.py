"""Calibration: what the inputs of the float model's linear layers look like on real images, at export.

    images = calibration_images(None, 224)             # the packaged samples and procedural scenes
    features = vision_inputs(vision_onnx, pixels, collector)
    decoder_inputs(weights, config, features, text_ids, collector)
    stats = collector.stats()                          # site -> SiteStats

The vision encoder runs as its exported float32 graph (every MatMul input exposed as an output); the decoder
runs here in numpy, layer by layer from the checkpoint's weights (one layer's weights in memory at a time),
over each image's whole prompt as the decoder graph runs it (image features, `<bos>`, prompt, `\\n`,
attending bidirectionally; positions from 1). A site is one tensor that linear layers read: in the decoder
`layers.N.qkv` (q, k, v), `layers.N.o`, `layers.N.mlp` (gate, up) and `layers.N.down`; in the vision
encoder the MatMul's input tensor name. `SiteStats` keeps each channel's peak, each row's peak, and rows for
measuring a kernel's error (export/linear.py). Never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..runtime.preprocess import IMAGE_EXTENSIONS, ImageLoadError, ImageSpec, image_pixels, load_image
from ..samples import sample_images
from ..testmodels.scenes import TRAIN_STREAM, make_scenes, render
from .linear import SitePlan, plan_site, sample_outputs
from .quantize import CPU_ACCURACY_LEVEL, Kernel

SAMPLE_IMAGES = 4  # the default calibration set: the packaged sample images ...
SCENES = 4  # ... and procedural scenes (from the training stream: never the evaluation scenes)
MAX_IMAGES = 32  # at most this many of a --calibration folder's images (the first in sorted order)
MAX_DECODER_ROWS = 600  # the decoder runs on as many images' prompts as fit (at least one): 2 at 224 px
KEPT_ROWS = 128  # rows kept per site for measuring errors: the largest (spike tokens) and a spread
PEAK_ROWS = 32  # ... of which the rows with the largest peaks
OUTLIER_RATIO = 8.0  # a channel whose peak is this many times the median channel peak is an outlier
SPIKE_RATIO = 8.0  # a row whose peak is this many times the median row peak is a spike


class CalibrationError(Exception):
    """The calibration images cannot be used (a missing or empty folder)."""


def calibration_images(folder: Path | None, size: int) -> list[Image.Image]:
    """The images the float model is run on: a folder's (the first MAX_IMAGES in sorted order, recursively),
    or by default the packaged samples and procedural scenes."""
    if folder is None:
        return sample_images(SAMPLE_IMAGES, size) + [render(scene, size)
                                                     for scene in make_scenes(SCENES, stream=TRAIN_STREAM)]
    if not folder.is_dir():
        raise CalibrationError(f"--calibration {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    images = []
    for path in paths[:MAX_IMAGES]:
        try:
            images.append(load_image(path))
        except ImageLoadError:
            continue  # an unreadable image is not calibration data
    if not images:
        raise CalibrationError(f"--calibration {folder} holds no readable images")
    return images


@dataclass
class SiteStats:
    """One site on the calibration set: `peaks` [K] each channel's max |x|, `means` [K] its mean |x|,
    `row_peaks` [rows] each row's max |x|, and `rows` [<= KEPT_ROWS, K] rows kept for measuring errors."""

    peaks: np.ndarray
    means: np.ndarray
    row_peaks: np.ndarray
    rows: np.ndarray

    def summary(self) -> dict[str, Any]:
        """Tokens seen, the largest value, how far the largest channel stands above the median one, and how
        many channels and rows stand OUTLIER_RATIO / SPIKE_RATIO above the median."""
        channel, row = float(np.median(self.peaks)) or 1e-30, float(np.median(self.row_peaks)) or 1e-30
        return {"tokens": int(self.row_peaks.size), "peak": round(float(self.peaks.max()), 3),
                "channel_ratio": round(float(self.peaks.max()) / channel, 1),
                "outlier_channels": int((self.peaks > OUTLIER_RATIO * channel).sum()),
                "spike_tokens": int((self.row_peaks > SPIKE_RATIO * row).sum())}


class Collector:
    """Accumulates SiteStats from the activations a forward pass hands it, site by site, and with them the
    weights of the layers reading each site (`linear.sample_outputs` of them, for measuring kernels)."""

    def __init__(self) -> None:
        self.weights: dict[str, np.ndarray] = {}
        self._peaks: dict[str, np.ndarray] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._row_peaks: dict[str, list[np.ndarray]] = {}
        self._rows: dict[str, list[np.ndarray]] = {}

    def add(self, site: str, x: np.ndarray) -> None:
        """Rows of one site's input ([..., K])."""
        rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        magnitude = np.abs(rows)
        peaks = magnitude.max(axis=0)
        self._peaks[site] = np.maximum(self._peaks[site], peaks) if site in self._peaks else peaks
        sums = magnitude.sum(axis=0, dtype=np.float64)
        self._sums[site] = self._sums[site] + sums if site in self._sums else sums
        row_peaks = magnitude.max(axis=1)
        self._row_peaks.setdefault(site, []).append(row_peaks)
        self._rows.setdefault(site, []).append(rows[_kept(row_peaks)])

    def add_weights(self, site: str, weights: list[np.ndarray]) -> None:
        """The [N, K] weights of the layers that read `site` (concatenated along N, then sampled)."""
        self.weights[site] = sample_outputs(np.concatenate(weights))

    def stats(self) -> dict[str, SiteStats]:
        result = {}
        for site, peaks in self._peaks.items():
            row_peaks = np.concatenate(self._row_peaks[site])
            candidates = np.concatenate(self._rows[site])
            rows = candidates[_kept(np.abs(candidates).max(axis=1))]
            result[site] = SiteStats(peaks, (self._sums[site] / row_peaks.size).astype(np.float32), row_peaks, rows)
        return result


def _kept(row_peaks: np.ndarray) -> np.ndarray:
    """Indices of the rows to keep: the PEAK_ROWS largest, then rows spread evenly over the others."""
    if row_peaks.size <= KEPT_ROWS:
        return np.arange(row_peaks.size)
    largest = np.argsort(-row_peaks, kind="stable")[:PEAK_ROWS]
    rest = np.setdiff1d(np.arange(row_peaks.size), largest)
    spread = rest[np.linspace(0, rest.size - 1, KEPT_ROWS - PEAK_ROWS).round().astype(int)]
    return np.sort(np.concatenate([largest, spread]))


def vision_inputs(graph: Path, pixels: np.ndarray, collector: Collector) -> np.ndarray:
    """Run the float32 vision graph on `pixels` [n, 3, H, W] one image at a time, handing every MatMul's input
    (by constant weight) to `collector` under its tensor name; returns the image features."""
    import onnx
    import onnxruntime as ort

    from ..runtime.sessions import session_options

    model = onnx.load(str(graph), load_external_data=False)
    sites = matmul_inputs(model)
    for name in sites:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = graph.with_name(graph.stem + ".calibration.onnx")  # beside the graph: its data file is found
    onnx.save_model(model, str(probe))
    try:
        session = ort.InferenceSession(str(probe), session_options(None), providers=["CPUExecutionProvider"])
        features = []
        for image in pixels:
            outputs = session.run(None, {session.get_inputs()[0].name: image[None].astype(np.float32)})
            features.append(outputs[0][0])
            for name, value in zip(sites, outputs[1:]):
                collector.add(name, value)
    finally:
        probe.unlink(missing_ok=True)
    return np.stack(features)


def matmul_inputs(model: Any) -> list[str]:
    """The distinct activation inputs of a graph's MatMuls by constant 2-D weights (what graph_quantize.quantize_graph
    quantizes), in node order."""
    weights = {init.name for init in model.graph.initializer if len(init.dims) == 2}
    names = [node.input[0] for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    return list(dict.fromkeys(names))


class DecoderSource(Protocol):
    """The checkpoint reader `export.weights.CheckpointWeights` (linear, norm, rotary, embedding_rows)."""

    def linear(self, layer: int, name: str) -> np.ndarray: ...

    def norm(self, layer: int | None, name: str) -> np.ndarray: ...

    def rotary(self, positions: int) -> tuple[np.ndarray, np.ndarray]: ...

    def embedding_rows(self, ids: list[int]) -> np.ndarray: ...


def decoder_inputs(source: DecoderSource, config: Any, features: np.ndarray, text_ids: list[int],
                   collector: Collector) -> None:
    """The float decoder (export.decoder.DecoderConfig `config`) over each image's prompt: its image
    `features` [b, tokens, hidden] then the embedded `text_ids` (`<bos>`, prompt, `\\n`), all attending to
    each other, handing each layer's linear inputs, and the weights reading them, to `collector`."""
    c = config
    text = source.embedding_rows(text_ids).astype(np.float32) * np.float32(c.hidden**0.5)
    h = np.concatenate([features.astype(np.float32), np.broadcast_to(text, (len(features), *text.shape))], axis=1)
    cos, sin = source.rotary(h.shape[1])
    pre_mlp = "pre_feedforward_layernorm" if c.gemma2 else "post_attention_layernorm"
    for i in range(c.layers):
        x = _rms(h, source.norm(i, "input_layernorm"), c.eps)
        collector.add(f"layers.{i}.qkv", x)
        qkv = [source.linear(i, part) for part in "qkv"]
        collector.add_weights(f"layers.{i}.qkv", qkv)
        attention = _attention(x, qkv, cos, sin, c)
        del qkv
        collector.add(f"layers.{i}.o", attention)
        weight = source.linear(i, "o")
        collector.add_weights(f"layers.{i}.o", [weight])
        out = attention @ weight.T
        if c.gemma2:
            out = _rms(out, source.norm(i, "post_attention_layernorm"), c.eps)
        h = h + out
        x = _rms(h, source.norm(i, pre_mlp), c.eps)
        collector.add(f"layers.{i}.mlp", x)
        gate, up = source.linear(i, "gate"), source.linear(i, "up")
        collector.add_weights(f"layers.{i}.mlp", [gate, up])
        mlp = _gelu_tanh(x @ gate.T) * (x @ up.T)
        del gate, up
        collector.add(f"layers.{i}.down", mlp)
        weight = source.linear(i, "down")
        collector.add_weights(f"layers.{i}.down", [weight])
        out = mlp @ weight.T
        if c.gemma2:
            out = _rms(out, source.norm(i, "post_feedforward_layernorm"), c.eps)
        h = h + out


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Gemma's RMSNorm: x / rms(x) * (1 + w), in float32."""
    scale = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(eps))
    return (x * scale * (1.0 + w.astype(np.float32))).astype(np.float32)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    inner = x * (np.float32(np.sqrt(2 / np.pi)) * (1.0 + np.float32(0.044715) * x * x))
    return 0.5 * x * (1.0 + np.tanh(inner))


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding on [b, n, heads, head_dim], halves convention (GroupQueryAttention's rotary_interleaved=0)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return np.concatenate([first * c - second * s, second * c + first * s], axis=-1)


def _attention(x: np.ndarray, qkv: list[np.ndarray], cos: np.ndarray, sin: np.ndarray, c: Any) -> np.ndarray:
    """Bidirectional attention over each row's whole prompt -> [b, n, heads * head_dim] (o_proj's input)."""
    b, n, _ = x.shape
    q, k, v = (x @ w.T for w in qkv)
    q = _rotate(q.reshape(b, n, c.heads, c.head_dim), cos, sin)
    k = _rotate(k.reshape(b, n, c.kv_heads, c.head_dim), cos, sin)
    v = v.reshape(b, n, c.kv_heads, c.head_dim)
    group = c.heads // c.kv_heads
    out = np.empty((b, n, c.heads, c.head_dim), dtype=np.float32)
    for row in range(b):  # one image at a time: scores are [heads, n, n]
        queries = q[row].transpose(1, 0, 2)  # [heads, n, d]
        keys = np.repeat(k[row], group, axis=1).transpose(1, 2, 0)  # [heads, d, n]
        values = np.repeat(v[row], group, axis=1).transpose(1, 0, 2)  # [heads, n, d]
        scores = (queries @ keys) * np.float32(c.scale)
        if c.attn_softcap:
            scores = np.tanh(scores / np.float32(c.attn_softcap)) * np.float32(c.attn_softcap)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out[row] = (scores @ values).transpose(1, 0, 2)
    return out.reshape(b, n, -1)


class Calibration:
    """Site statistics of the vision encoder and the decoder on the calibration images, with each site's
    weights (`linear.sample_outputs` of the layers reading it), for measuring kernels on them (`check`)."""

    def __init__(self, images: str, stats: dict[str, dict[str, SiteStats]], weights: dict[str, dict[str, np.ndarray]]):
        self.images, self.stats, self.weights = images, stats, weights
        self._plans: dict[tuple[str, str], dict[str, SitePlan]] = {}

    def check(self, graph: str, kernel: Kernel) -> dict[str, SitePlan]:
        """How each site of `graph` ("vision" or "decoder") is best fed to `kernel` (export/linear.py)."""
        if (graph, kernel.name) not in self._plans:
            self._plans[graph, kernel.name] = {
                site: plan_site(s.rows, s.peaks, self.weights[graph][site], kernel, CPU_ACCURACY_LEVEL)
                for site, s in self.stats[graph].items()}
        return self._plans[graph, kernel.name]

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per graph and site, `SiteStats.summary`."""
        return {graph: {site: s.summary() for site, s in by.items()} for graph, by in self.stats.items()}


def calibrate(images: list[Image.Image], described: str, spec: ImageSpec, vision_graph: Path, source: Any,
              config: Any, text_ids: list[int], say: Callable[[str], None]) -> Calibration:
    """Run the float model on `images` (described as `described`): the exported float32 `vision_graph`, then
    the decoder from `source` (`CheckpointWeights`) over as many images' prompts (`text_ids` after the image
    tokens) as MAX_DECODER_ROWS allow."""
    import onnx

    pixels = np.stack([image_pixels(image, spec) for image in images])
    vision = Collector()
    say(f"calibrating on {described}: the vision encoder")
    features = vision_inputs(vision_graph, pixels, vision)
    decoder = Collector()
    count = max(1, MAX_DECODER_ROWS // (features.shape[1] + len(text_ids)))
    say(f"calibrating on {described}: the decoder ({min(count, len(features))} prompts)")
    decoder_inputs(source, config, features[:count], text_ids, decoder)
    model = onnx.load(str(vision_graph), load_external_data=False)
    vision_weights = _vision_weights(model, str(vision_graph.parent))
    return Calibration(described, {"vision": vision.stats(), "decoder": decoder.stats()},
                       {"vision": vision_weights, "decoder": decoder.weights})


def _vision_weights(model: Any, base: str) -> dict[str, np.ndarray]:
    """Per MatMul input of the vision graph, the sampled [N, K] weights of the MatMuls reading it."""
    from .graph_quantize import load_initializer

    initializers = {init.name: init for init in model.graph.initializer if len(init.dims) == 2}
    readers: dict[str, list[np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            weight = load_initializer(initializers[node.input[1]], base).T  # [N, K]
            readers.setdefault(node.input[0], []).append(sample_outputs(weight))
    return {site: np.concatenate(weights) for site, weights in readers.items()}


def spiky_channels(folder: Path, count: int) -> dict[int, list[int]]:
    """Per decoder layer of the checkpoint in `folder`, the `count` MLP intermediate channels (down_proj's
    input) that are the most token-specific on the default calibration images: the largest peak over mean
    magnitude among the channels whose peak is at least the median one (testmodels/stress.py makes spikes of
    them). Loads the model with transformers (export side only)."""
    import torch

    from .checkpoint import open_checkpoint
    from .decoder import DecoderConfig
    from .vision import VisionEncoder
    from .weights import CheckpointWeights

    checkpoint = open_checkpoint(folder, dtype="float32")
    spec = ImageSpec(checkpoint.image_size, checkpoint.image_mean, checkpoint.image_std, checkpoint.rescale_factor,
                     checkpoint.resample)
    pixels = np.stack([image_pixels(image, spec) for image in calibration_images(None, checkpoint.image_size)])
    with torch.no_grad():
        features = VisionEncoder.of(checkpoint.model).eval()(torch.from_numpy(pixels)).numpy()
    config = DecoderConfig.from_text_config(checkpoint.config.text_config)
    text = [checkpoint.bos_token_id] + checkpoint.tokenizer.encode("caption en\n", add_special_tokens=False)
    collector = Collector()
    decoder_inputs(CheckpointWeights(checkpoint.folder, checkpoint.config.text_config), config, features, text,
                   collector)
    stats = collector.stats()
    chosen = {}
    for layer in range(config.layers):
        s = stats[f"layers.{layer}.down"]
        score = np.where(s.peaks >= np.median(s.peaks), s.peaks / np.maximum(s.means, 1e-30), 0.0)
        chosen[layer] = sorted(np.argsort(-score, kind="stable")[:count].tolist())
    return chosen

"""Calibration at export: the float model's linear-layer inputs on real images, as transformers computes them."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from palionnx.export.calibrate import (
    CalibrationError,
    Collector,
    calibration_images,
    decoder_inputs,
    matmul_inputs,
)
from palionnx.runtime.manifest import Manifest
from palionnx.samples import sample_images

FAMILIES = ["tiny-pg1", "tiny-pg2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_inputs_are_the_float_models(family, checkpoints, reference):
    """Every site's channel peaks equal those of the same inputs hooked in transformers' forward over the
    same prompts (bidirectional, positions from 1, Gemma 2's norms and soft-capping)."""
    from palionnx.export.checkpoint import open_checkpoint
    from palionnx.export.decoder import DecoderConfig
    from palionnx.export.vision import VisionEncoder
    from palionnx.export.weights import CheckpointWeights

    checkpoint = open_checkpoint(checkpoints[family], dtype="float32")
    model = checkpoint.model.eval()
    pixels = torch.tensor(np.random.default_rng(0).standard_normal((2, 3, checkpoint.image_size,
                                                                     checkpoint.image_size)), dtype=torch.float32)
    with torch.no_grad():
        features = VisionEncoder.of(model)(pixels).numpy()
    text = [checkpoint.bos_token_id] + checkpoint.tokenizer.encode("caption en\n", add_special_tokens=False)
    collector = Collector()
    decoder_inputs(CheckpointWeights(checkpoint.folder, checkpoint.config.text_config),
                   DecoderConfig.from_text_config(checkpoint.config.text_config), features, text, collector)
    stats = collector.stats()

    hooked: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for site, module in (("qkv", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                             ("mlp", layer.mlp.gate_proj), ("down", layer.mlp.down_proj)):
            module.register_forward_hook(lambda m, args, out, key=f"layers.{i}.{site}":
                                         hooked.__setitem__(key, args[0].numpy()))
    ids = torch.tensor([[checkpoint.config.image_token_id] * checkpoint.image_seq_length + text] * 2)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
              token_type_ids=torch.zeros_like(ids))
    assert set(hooked) == set(stats)
    for site, value in hooked.items():
        rows = value.reshape(-1, value.shape[-1])
        np.testing.assert_allclose(stats[site].peaks, np.abs(rows).max(0), rtol=1e-4, atol=1e-5 * np.abs(rows).max())
        assert stats[site].row_peaks.size == len(rows) and stats[site].rows.shape[1] == rows.shape[1]


def test_collector_keeps_the_largest_rows_and_a_spread():
    collector = Collector()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((1000, 16)).astype(np.float32)
    rows[[17, 600], 3] = 500.0  # two spike tokens
    collector.add("site", rows[:500])
    collector.add("site", rows[500:])
    stats = collector.stats()["site"]
    assert stats.rows.shape == (128, 16) and (np.abs(stats.rows).max(1) == 500.0).sum() == 2
    summary = stats.summary()
    assert summary["tokens"] == 1000 and summary["spike_tokens"] == 2 and summary["outlier_channels"] == 1
    np.testing.assert_allclose(stats.means, np.abs(rows).mean(0), rtol=1e-5)


def test_calibration_images_default_and_from_a_folder(tmp_path):
    images = calibration_images(None, 64)
    assert len(images) == 8 and {image.size for image in images} == {(64, 64)}
    for i, image in enumerate(sample_images(3, 32)):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert len(calibration_images(tmp_path, 64)) == 3  # the broken one and the text file are skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no readable images"):
        calibration_images(tmp_path / "empty", 64)


def test_export_calibrates_on_a_folder(checkpoints, tmp_path):
    from palionnx.export.convert import ExportError, export

    for i, image in enumerate(sample_images(2, 64)):
        image.save(tmp_path / f"{i}.png")
    manifest = export(checkpoints["tiny-pg2"], tmp_path / "int8", quant="int8", device="cpu", calibration=tmp_path)
    cpu = manifest.quant.cpu_kernels
    assert cpu.calibration == f"{tmp_path} (2 images)"
    assert all(s["tokens"] == 2 * 4 for s in cpu.activations["vision"].values())  # 2 images, 4 patches each
    with pytest.raises(ExportError, match="--calibration is for int8/int4"):
        export(checkpoints["tiny-pg2"], tmp_path / "fp32", quant="fp32", calibration=tmp_path)
    with pytest.raises(ExportError, match="not a folder"):
        export(checkpoints["tiny-pg2"], tmp_path / "x", quant="int4", device="cpu", calibration=tmp_path / "none")
    bad = subprocess.run([sys.executable, "-m", "palionnx", "export", str(checkpoints["tiny-pg1"]), "-o",
                          str(tmp_path / "y"), "--quant", "int4", "--calibration", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("is not a folder of images")


def test_vision_sites_are_the_quantized_matmuls_inputs(exported):
    import onnx

    folder = exported("tiny-pg1", "int4")
    cpu = Manifest.load(folder).quant.cpu_kernels
    fp32 = onnx.load(str(exported("tiny-pg1", "fp32") / "vision_encoder.onnx"), load_external_data=False)
    assert list(cpu.activations["vision"]) == matmul_inputs(fp32) == list(cpu.sites["vision_encoder"])

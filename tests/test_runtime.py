"""Runtime pieces on their own: preprocessing, generation controls, isolation from torch, bad inputs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from palionnx import Captioner
from palionnx.runtime import generate
from palionnx.runtime.preprocess import ImageLoadError, load_image, pixel_values


def _photo(width=61, height=47, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [28, 224])
def test_pixel_values_match_siglip_processor(size):
    from transformers import SiglipImageProcessorPil

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.5]
    processor = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std,
                                        resample=3)
    images = [_photo(seed=1), _photo(300, 200, seed=2), _photo(size, size, seed=3)]
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    ours = pixel_values(images, size, mean, std)
    assert ours.shape == expected.shape == (3, 3, size, size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(_save(rgba, tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (0, 255))
    assert load_image(_save(la, tmp_path / "la.png")).getpixel((0, 0)) == (0, 0, 0)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    assert load_image(_save(palette, tmp_path / "p.png", transparency=0)).getpixel((0, 0)) == (0, 255, 0)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert load_image(_save(cmyk, tmp_path / "c.jpg")).mode == "RGB"
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert load_image(_save(grey16, tmp_path / "g16.png")).getpixel((0, 0)) == (255, 255, 255)
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert load_image(gif).getpixel((0, 0))[0] > 200  # first frame: red


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(image, tmp_path / "rot.jpg", exif=exif)
    assert load_image(path).size == (10, 20)


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = _save(_photo(), tmp_path / "good.jpg")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    for name in ("empty.png", "text.jpg", "cut.jpg", "missing.png"):
        with pytest.raises(ImageLoadError, match=name):
            load_image(tmp_path / name)


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    path = _save(_photo(200, 200), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow errors past 2x this
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path)


def test_bad_inputs_do_not_poison_the_batch(tmp_path, numpy_folder):
    good = [_save(_photo(seed=i), tmp_path / f"good{i}.png") for i in range(3)]
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    mixed = captioner.caption([good[0], bad, good[1], tmp_path / "missing.png", good[2]], max_new_tokens=6)
    alone = captioner.caption(good, max_new_tokens=6)
    assert [r.ok for r in mixed] == [True, False, True, False, True]
    assert "bad.jpg" in mixed[1].error and "missing.png" in mixed[3].error
    assert [r.tokens for r in mixed if r.ok] == [r.tokens for r in alone]
    assert all(r.timings.decode_steps > 0 and r.timings.prefill_s > 0 for r in alone)


def test_runtime_imports_neither_torch_nor_transformers(tmp_path, exported):
    image = _save(_photo(), tmp_path / "x.png")
    code = (
        "import sys, json\n"
        "from palionnx import Captioner\n"
        f"cap = Captioner.load({str(exported('tiny-pg2', 'int4'))!r}, device='cpu')\n"
        f"r = cap.caption([{str(image)!r}], max_new_tokens=5)[0]\n"
        "print(json.dumps({'ok': r.ok, 'tokens': r.tokens,"
        " 'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["tokens"] and result["loaded"] == []


def test_cuda_request_without_cuda_is_an_error(exported):
    from palionnx.runtime.providers import cuda_available
    from palionnx.runtime.sessions import DeviceError

    if cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        Captioner.load(exported("tiny-pg1", "fp16"), device="cuda")
    assert Captioner.load(exported("tiny-pg1", "fp16"), device="auto").providers == ["CPUExecutionProvider"]


def test_folder_built_for_the_cpu_refuses_cuda(numpy_folder):
    """fp32 computes in float32, which onnxruntime's CUDA attention lacks: say how to export for CUDA."""
    from palionnx.runtime.sessions import DeviceError

    with pytest.raises(DeviceError, match="--quant fp16"):
        Captioner.load(numpy_folder("tiny-pg1"), device="cuda")
    assert Captioner.load(numpy_folder("tiny-pg1"), device="auto").device == "cpu"


# --- generation controls against transformers' own processors on the same logits ---

def _logits_and_history(seed=0, batch=3, vocab=50, length=12):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, vocab)).astype(np.float32) * 3, rng.integers(0, vocab, (batch, length))


@pytest.mark.parametrize("penalty", [1.15, 0.8])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, history = _logits_and_history()
    (process,) = generate.make_logits_processors(repetition_penalty=penalty)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(history), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(process(history, logits), expected, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(n):
    from transformers import NoRepeatNGramLogitsProcessor

    logits, _ = _logits_and_history()
    history = np.array([[1, 2, 1, 2, 3, 1, 2], [4, 4, 4, 4, 4, 4, 4], [5, 6, 7, 8, 9, 5, 6]])
    (process,) = generate.make_logits_processors(no_repeat_ngram_size=n)
    expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor(history), torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(process(history, logits), expected)


@pytest.mark.parametrize(("k", "p"), [(0, 0.9), (5, 1.0), (10, 0.5), (50, 0.95)])
def test_top_k_top_p_match_transformers(k, p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits, history = _logits_and_history(seed=k)
    scores = TemperatureLogitsWarper(0.7)(torch.tensor(history), torch.tensor(logits))
    if k:
        scores = TopKLogitsWarper(k)(torch.tensor(history), scores)
    if p < 1:
        scores = TopPLogitsWarper(p)(torch.tensor(history), scores)
    ours = logits / np.float32(0.7)
    if k:
        ours = generate._top_k(ours, k)
    if p < 1:
        ours = generate._top_p(ours, p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(scores.numpy()))
    kept = ~np.isinf(ours)
    np.testing.assert_allclose(ours[kept], scores.numpy()[kept], rtol=1e-6)


def test_sampler_is_seeded_and_stays_in_the_nucleus():
    logits, _ = _logits_and_history(batch=2, vocab=30)
    draws = [generate.make_sampler(0.7, top_k=5, top_p=0.9, seed=7)(logits) for _ in range(2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    sampler = generate.make_sampler(1.0, top_k=3, seed=1)
    allowed = np.argsort(logits, axis=-1)[:, -3:]
    for _ in range(50):
        tokens = sampler(logits)
        assert all(t in allowed[row] for row, t in enumerate(tokens))
    assert generate.make_sampler(0.0) is generate.greedy


def test_sampled_captions_are_reproducible(numpy_folder):
    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    image = _photo()
    def sampled(seed):
        return captioner.caption([image], max_new_tokens=12, sampler=generate.make_sampler(0.7, 50, 0.9, seed),
                                 logits_processors=generate.make_logits_processors(1.15, 2))[0].tokens

    first = sampled(3)
    assert sampled(3) == first
    assert any(sampled(s) != first for s in range(4, 8))


def test_device_is_decided_once_for_all_graphs(monkeypatch, tmp_path):
    """Under auto, a CUDA provider that fails to start for any one graph puts every graph on the CPU;
    an explicit cuda request fails instead."""
    import onnxruntime as ort

    from palionnx.runtime import sessions

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=()):
            cuda_starts = "decoder" not in str(path)  # CUDA starts for the vision graph only
            self.providers = [p for p in providers if p != "CUDAExecutionProvider" or cuda_starts]

        def get_providers(self):
            return self.providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    paths = {"vision_encoder": tmp_path / "vision.onnx", "decoder": tmp_path / "decoder.onnx"}
    opened, device = sessions.open_sessions(paths, "auto")
    assert device == "cpu"
    assert all(s.get_providers() == ["CPUExecutionProvider"] for s in opened.values())
    with pytest.raises(sessions.DeviceError, match="decoder.onnx"):
        sessions.open_sessions(paths, "cuda")
    opened, device = sessions.open_sessions({"vision_encoder": paths["vision_encoder"]}, "auto")
    assert device == "cuda" and opened["vision_encoder"].get_providers()[0] == "CUDAExecutionProvider"


def test_rows_prefilled_one_at_a_time_equal_the_batched_prefill(numpy_folder):
    """Each row fills its own cache rows: prefilling rows separately (as CUDA does for Gemma 2 batches of
    different prompt lengths) gives the batched result."""
    prompts = ["caption en", "describe this picture in great detail", "caption en", "x"]
    captioner = Captioner.load(numpy_folder("tiny-pg2"), device="cpu")
    images = [_photo(seed=i) for i in range(4)]
    batched = captioner.caption(images, prompt=prompts, max_new_tokens=16, batch_size=4)
    captioner.model.prefill_rows_alone = True
    alone = captioner.caption(images, prompt=prompts, max_new_tokens=16, batch_size=4)
    assert [r.tokens for r in alone] == [r.tokens for r in batched] and all(r.tokens for r in alone)


def test_cache_floor_lengthens_small_batches_caches_only(numpy_folder):
    """The minimum KV-cache length (on by default on CUDA only) gives small batches a longer cache and leaves
    the captions as they are; larger batches keep the length they ask for."""
    from palionnx.runtime.defaults import CUDA_SMALL_BATCH
    from palionnx.runtime.limits import kv_cache_bytes, request_bytes
    from palionnx.samples import sample_images

    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    model = captioner.model
    assert model.min_cache_slots == 0  # the CPU's attention follows the cache length: no floor there
    images = sample_images(3)
    plain = [r.tokens for r in captioner.caption(images, max_new_tokens=12, batch_size=3, ignore_eos=True)]
    model.min_cache_slots = 256
    assert model.cache_slots(3, 40) == 256 and model.cache_slots(CUDA_SMALL_BATCH + 1, 40) == 40
    assert model.cache_slots(1, 8000) == 8000 and model.cache_slots(1, 10) <= captioner.manifest.max_positions
    assert model.new_state(3, 40).max_len == 256
    # the memory estimate behind --max-memory counts the cache the floor makes
    m = captioner.manifest
    assert request_bytes(m, 3, 20, 20, 256) - request_bytes(m, 3, 20, 20) == kv_cache_bytes(m, 3, 256 - 40)
    floored = [r.tokens for r in captioner.caption(images, max_new_tokens=12, batch_size=3, ignore_eos=True)]
    assert floored == plain

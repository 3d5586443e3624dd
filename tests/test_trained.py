"""The trained test model: a normal checkpoint, deterministic, cached, and right on held-out scenes.

The quality minimums are exact-match rates on 200 held-out scenes (seed 0, `caption en`, greedy) of the
trained shapes-pg1 exported at fp32 and at int4 (block 128, MatMulNBits kernels).
"""

import dataclasses

from palionnx import Captioner
from palionnx.export.validate import validate
from palionnx.testmodels import trained
from palionnx.testmodels.evaluation import evaluate
from palionnx.testmodels.scenes import make_scenes, render
from palionnx.testmodels.synth import GEOMETRIES
from palionnx.testmodels.train import Recipe, train

# Measured on the AMD EPYC VM (2 cores): fp32 96.0 %, int4 block 128 96.5 % (benchmarks/trained_quality.py).
# Asserted with a 6-point margin (another CPU's kernels train slightly different weights); 0.90 is also the
# exact-match rate the recipe was made to reach.
FP32_MIN = 0.90
INT4_MIN = 0.90


def test_fp32_export_captions_held_out_scenes(shapes_exported):
    report = evaluate(Captioner.load(shapes_exported("fp32"), device="cpu"), count=200, seed=0, batch_size=16)
    assert report.exact_match >= FP32_MIN, report.summary()


def test_int4_block_128_export_captions_held_out_scenes(shapes_exported):
    report = evaluate(Captioner.load(shapes_exported("int4", 128), device="cpu"), count=200, seed=0, batch_size=16)
    assert report.exact_match >= INT4_MIN, report.summary()


def test_evaluate_captions_the_scenes_it_is_given(shapes_exported):
    """Given scenes (the benchmark's edge set) replace the stream's: the report scores those, in order."""
    scenes = [dataclasses.replace(scene, background="plain") for scene in make_scenes(6, seed=3)]
    report = evaluate(Captioner.load(shapes_exported("fp32"), device="cpu"), count=200, seed=3, scenes=scenes)
    assert [s.truth for s in report.scenes] == [scene.truth("caption en") for scene in scenes]  # not 200 others


def test_trained_checkpoint_exports_exactly(shapes_pg1, shapes_exported):
    """The trained checkpoint is a normal transformers PaliGemma: the export follows generate() token for token."""
    size = trained.RECIPES["shapes-pg1"].geometry.image_size
    images = [render(scene, size) for scene in make_scenes(4, seed=7)]
    report = validate(shapes_pg1, shapes_exported("fp32"), images=images, max_new_tokens=120)
    assert report.exact_sequences == 4, report.summary()


TINY = Recipe(geometry=dataclasses.replace(GEOMETRIES["tiny-pg1"], image_size=96, patch_size=32, text_vocab=1024),
              vision_steps=2, steps=2, batch_size=4, lr=1e-3, vision_lr=1e-3, warmup=1, scenes=8)


def test_training_is_deterministic_for_a_seed():
    tokenizer = trained.tokenizer_for(TINY.geometry)
    first, second = train(TINY, tokenizer).state_dict(), train(TINY, tokenizer).state_dict()
    assert all(first[name].equal(second[name]) for name in first)
    other = train(dataclasses.replace(TINY, seed=1), tokenizer).state_dict()
    assert not all(first[name].equal(other[name]) for name in first)


def test_checkpoints_are_cached_by_recipe_and_code(tmp_path, monkeypatch):
    monkeypatch.setitem(trained.RECIPES, "tiny", TINY)
    folder = trained.trained_checkpoint("tiny", tmp_path)
    assert (folder / "config.json").is_file() and folder.name == f"tiny-{trained.cache_key('tiny')}"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(trained.train, "train", no_training)
    assert trained.trained_checkpoint("tiny", tmp_path) == folder
    monkeypatch.setitem(trained.RECIPES, "tiny", dataclasses.replace(TINY, steps=3))
    assert trained.cache_key("tiny") not in folder.name  # another recipe, another checkpoint

"""A quality check for any model: a folder against a reference export of the same checkpoint, on any images
(`palionnx eval FOLDER --reference REF [INPUT...]`, `palionnx bench --reference REF`)."""

import json
import subprocess
import sys

import numpy as np

from palionnx import Captioner
from palionnx.agreement import agreement, forced_logits, reference_run
from palionnx.samples import sample_images


def _palionnx(*args):
    return subprocess.run([sys.executable, "-m", "palionnx", *map(str, args)], capture_output=True, text=True)


def test_a_folder_agrees_with_itself_and_an_int4_one_less(exported):
    images = sample_images(3, 28)
    reference = Captioner.load(exported("tiny-pg1", "fp32"), device="cpu")
    run = reference_run(reference, images, max_new_tokens=8)
    assert all(len(tokens) == 8 for tokens in run.tokens) and run.logits[0].shape == (8, reference.manifest.vocab_size)
    same = agreement(reference, run).summary()
    assert same["exact_match"] == same["token_agreement"] == same["forced_agreement"] == 1.0
    assert same["forced_cosine"] > 0.99999
    report = agreement(Captioner.load(exported("tiny-pg1", "int4"), device="cpu"), run)
    summary = report.summary()
    assert summary["forced_cosine"] < 0.9999 and summary["forced_agreement"] < 1.0  # the random tiny model strays
    assert report.worst(1)[0].forced_cosine == min(i.forced_cosine for i in report.images)


def test_forced_logits_follow_the_given_tokens(numpy_folder):
    """Teacher forcing feeds the given tokens, not the model's own: the logits at position p depend on the
    tokens before p only, whatever the batch's other rows are fed."""
    captioner = Captioner.load(numpy_folder("tiny-pg2"), device="cpu")
    images = sample_images(2, 28)
    alone = forced_logits(captioner, images[:1], [[5, 6, 7]], "caption en")[0]
    paired = forced_logits(captioner, images, [[5, 6, 7], [9]], "caption en")
    np.testing.assert_allclose(paired[0], alone, rtol=1e-4, atol=1e-4)
    assert paired[1].shape[0] == 1
    other = forced_logits(captioner, images[:1], [[5, 8, 7]], "caption en")[0]
    np.testing.assert_allclose(other[:2], alone[:2], rtol=1e-4, atol=1e-4)
    assert not np.allclose(other[2], alone[2])


def test_eval_reference_command(exported, tmp_path):
    fp32, int4 = exported("tiny-pg1", "fp32"), exported("tiny-pg1", "int4")
    run = _palionnx("eval", int4, "--reference", fp32, "--max-new-tokens", "6", "--json", tmp_path / "a.json")
    assert run.returncode == 0, run.stderr
    assert "same caption" in run.stdout and "logit cosine (forced)" in run.stdout and "worst: " in run.stdout
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["images"] == 12 and report["reference"] == str(fp32)
    assert {r["source"] for r in report["results"]} >= {"sample 0", "scene 7"}  # the default set, named
    for i, image in enumerate(sample_images(2, 28)):
        image.save(tmp_path / f"mine{i}.png")
    run = _palionnx("eval", int4, tmp_path / "mine0.png", tmp_path / "mine1.png", "--reference", fp32,
                    "--max-new-tokens", "4", "--json", tmp_path / "b.json")
    assert run.returncode == 0, run.stderr
    assert [r["source"] for r in json.loads((tmp_path / "b.json").read_text())["results"]] == [
        str(tmp_path / "mine0.png"), str(tmp_path / "mine1.png")]
    other = _palionnx("eval", int4, "--reference", exported("tiny-pg2", "fp32"))
    assert other.returncode == 2 and "are not exports of one checkpoint" in other.stderr
    stray = _palionnx("eval", int4, tmp_path / "mine0.png")
    assert stray.returncode == 2 and "for --reference" in stray.stderr
    missing = _palionnx("eval", int4, tmp_path / "none.png", "--reference", fp32)
    assert missing.returncode == 2 and "none.png" in missing.stderr


def test_bench_reference_adds_agreement_columns(exported, tmp_path):
    fp32, int4 = exported("tiny-pg1", "fp32"), exported("tiny-pg1", "int4")
    run = _palionnx("bench", int4, "--reference", fp32, "--images", "1", "--max-new-tokens", "4", "--repeats", "1",
                    "--json", tmp_path / "bench.json")
    assert run.returncode == 0, run.stderr
    assert "cosine vs ref" in run.stdout and "next tok = ref" in run.stdout
    row = json.loads((tmp_path / "bench.json").read_text())[0]
    assert 0 < row["forced_cosine"] < 1 and row["reference"] == str(fp32)

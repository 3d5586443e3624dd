"""`palionnx eval`, `demo`, `synth shapes-pg1`, --min-words / --retries and the origin preset, run for real in
subprocesses on the trained shapes-pg1."""

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import palionnx

from palionnx.testmodels.scenes import TAGS_PROMPT, make_scenes, render
from palionnx.testmodels.trained import RECIPES

SIZE = RECIPES["shapes-pg1"].geometry.image_size


@pytest.fixture
def cache(tmp_path, shapes_pg1) -> Path:
    """A palionnx cache folder that already holds the trained checkpoint (so nothing trains again)."""
    root = tmp_path / "cache"
    shutil.copytree(shapes_pg1, root / "trained" / shapes_pg1.name)
    return root


def without_torch(root: Path) -> dict[str, str]:
    """Environment variables under which `import torch` and `import transformers` fail, as where they are
    not installed."""
    for name in ("torch", "transformers"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def scene_folder(root: Path, count: int, seed: int = 3) -> Path:
    root.mkdir()
    for i, scene in enumerate(make_scenes(count, seed)):
        render(scene, SIZE).save(root / f"{i}.png")
    return root


def test_eval_prints_and_writes_the_scores(tmp_path, shapes_exported):
    out = tmp_path / "eval.json"
    run = palionnx("eval", shapes_exported("fp32"), "--scenes", 24, "--seed", 1, "--json", out)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert len(report["results"]) == 24 and report["seed"] == 1 and report["scenes"] == 24
    assert report["exact_match"] == sum(r["exact"] for r in report["results"]) / 24
    assert set(report["attributes"]) == {"kind", "colour", "count", "position", "size", "background"}
    assert f"exact match     {report['exact_match']:.1%}" in run.stdout
    assert f"token accuracy  {report['token_accuracy']:.1%}" in run.stdout
    for name, value in report["attributes"].items():
        assert f"{name:15s} {value:.1%}" in run.stdout
    assert [r["truth"] for r in report["results"]] == [scene.truth() for scene in make_scenes(24, seed=1)]

    tags = palionnx("eval", shapes_exported("fp32"), "--scenes", 8, "--prompt", TAGS_PROMPT)
    assert tags.returncode == 0 and "size" not in tags.stdout and "kind" in tags.stdout


def test_eval_usage_errors_are_one_line(tmp_path, shapes_exported):
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    for args in (["--prompt", "describe en"], ["--device", "tpu"], ["--json", tmp_path / "missing" / "x.json"]):
        run = palionnx("eval", shapes_exported("fp32"), *args)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.count("error:") == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    for folder in (not_a_model, tmp_path / "nothing"):
        run = palionnx("eval", folder)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.strip().splitlines() == [f"error: {folder} is not a palionnx model folder (no "
                                                   "palionnx.json); create one with `palionnx export`"], run.stderr


def test_demo_exports_once_then_runs_without_torch(tmp_path, cache):
    env = {"PALIONNX_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    first = palionnx("demo", "--folder", tmp_path / "demo", "--scenes", 4, env=env)
    assert first.returncode == 0, first.stderr
    assert "training" not in first.stderr and "exporting shapes-pg1 at fp32" in first.stderr
    assert first.stdout.count("caption: ") == 4 and first.stdout.count("truth: ") == 4
    for i, scene in enumerate(make_scenes(4, seed=0)):
        assert f"truth:   {scene.truth()}" in first.stdout
        caption = (tmp_path / "demo" / f"scene-{i:03d}.txt").read_text()
        assert f"scene-{i:03d}.png" in first.stdout and f"caption: {caption}\n" in first.stdout
    assert "of 4 captions exactly right" in first.stdout and "token accuracy" in first.stdout

    offline = palionnx("demo", "--folder", tmp_path / "demo", "--scenes", 4,
                       env={**env, **without_torch(tmp_path / "blocker")})
    assert offline.returncode == 0, offline.stderr
    assert "exporting" not in offline.stderr and offline.stdout == first.stdout


def test_demo_without_torch_or_cache_says_what_to_install(tmp_path):
    env = {"PALIONNX_CACHE": str(tmp_path / "empty"), **without_torch(tmp_path / "blocker")}
    run = palionnx("demo", "--folder", tmp_path / "demo", env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "pip install 'palionnx[export]'" in run.stderr


def test_synth_copies_the_cached_trained_checkpoint(tmp_path, cache):
    run = palionnx("synth", "shapes-pg1", "-o", tmp_path / "ckpt", env={"PALIONNX_CACHE": str(cache)})
    assert run.returncode == 0, run.stderr
    assert "training" not in run.stderr
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == (
        next((cache / "trained").iterdir()) / "model.safetensors").read_bytes()
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()


def test_min_words_retries_and_the_origin_preset(tmp_path, shapes_exported):
    model = shapes_exported("fp32")
    data = scene_folder(tmp_path / "data", 3)
    jsonl = tmp_path / "run.jsonl"

    def records(*args) -> list[dict]:
        jsonl.unlink(missing_ok=True)
        run = palionnx("caption", data, "--model", model, "--overwrite", "--jsonl", jsonl, "--quiet", *args)
        assert run.returncode == 0, run.stderr
        return [json.loads(line) for line in jsonl.read_text().splitlines()]

    def attempts(*args) -> list[int]:
        return [record["attempts"] for record in records(*args)]

    # 8 tokens make at most 8 words: never the preset's 20, so each image is captioned 10 times, as the origin
    # script does (1 + 9 retries); options given explicitly win over the preset's (--max-new-tokens here,
    # --retries below).
    short = records("--prompt", TAGS_PROMPT, "--preset", "origin", "--max-new-tokens", 8, "--seed", 0)
    assert [r["attempts"] for r in short] == [10, 10, 10] and all(r["tokens"] <= 8 for r in short)
    assert attempts("--prompt", TAGS_PROMPT, "--preset", "origin", "--max-new-tokens", 8, "--retries", 2,
                    "--seed", 0) == [3, 3, 3]
    assert attempts("--min-words", 1, "--retries", 4, "--temperature", 0.7, "--seed", 0) == [1, 1, 1]
    assert attempts() == [1, 1, 1]
    # retry words, read in the caption: every scene's caption names its background, none a zebra
    assert attempts("--retry-words", "zebra,background", "--retries", 2, "--temperature", 0.7, "--seed", 0) == [3] * 3
    assert attempts("--retry-words", "zebra", "--retries", 2, "--temperature", 0.7, "--seed", 0) == [1, 1, 1]

    # The full preset: a caption is kept at once when its pruned text has 20 words, else captioned again until
    # it does or 10 have been made; the last one is written, in the origin's clean-up.
    for record in records("--preset", "origin", "--seed", 1):
        words = len(record["caption"].split())
        assert record["caption"].isascii() and "_" not in record["caption"]
        assert not record["caption"].endswith((".", ",")), record  # pruned
        assert 1 <= record["attempts"] <= 10
        assert words >= 20 or record["attempts"] == 10, record


def test_min_words_and_preset_usage_errors(tmp_path, shapes_exported):
    model = shapes_exported("fp32")
    data = scene_folder(tmp_path / "data", 1)
    for args, says in ((["--min-words", 5, "--retries", 2], "sampling"), (["--retries", 2], "--min-words"),
                       (["--min-words", 5, "--temperature", 0.7], "--retries"), (["--preset", "fancy"], "origin")):
        run = palionnx("caption", data, "--model", model, *args)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and says in run.stderr, run.stderr


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_help_reads_well(command):
    run = palionnx(command, "--help")
    assert run.returncode == 0 and "Example" in run.stdout and "Traceback" not in run.stderr


def test_tag_filters_on_the_trained_models_tags(tmp_path, shapes_exported):
    """`tags en` gives "two shapes, red circle, blue square, striped background": the filters act on those tags,
    after the clean-up and before the prefix, and --jsonl records the caption as written."""
    from palionnx.jobs.cleanup import filter_tags

    model = shapes_exported("fp32")
    data = scene_folder(tmp_path / "data", 4, seed=11)
    plain = palionnx("caption", data, "--model", model, "--prompt", TAGS_PROMPT, "-q")
    assert plain.returncode == 0, plain.stderr
    raw = {p.name: p.read_text() for p in sorted(data.glob("*.txt"))}
    assert all(", " in text for text in raw.values()), raw
    tags = tmp_path / "unwanted.txt"
    tags.write_text("striped background\ntwo shapes\n")
    jsonl = tmp_path / "run.jsonl"
    run = palionnx("caption", data, "--model", model, "--prompt", TAGS_PROMPT, "--overwrite", "--jsonl", jsonl,
                   "--exclude-tags", f"@{tags}", "--max-tags", 2, "--tag-underscores", "spaces", "--prefix", "sks, ",
                   "-q")
    assert run.returncode == 0, run.stderr
    for name, text in raw.items():
        expected = "sks, " + filter_tags(text, ("striped background", "two shapes"), "spaces", 2)
        assert (data / name).read_text() == expected
        assert "striped background" not in expected and len(expected.split(", ")) <= 3
    recorded = {Path(r["path"]).with_suffix(".txt").name: r["caption"]
                for r in map(json.loads, jsonl.read_text().splitlines())}
    assert recorded == {name: (data / name).read_text() for name in raw}


def test_existing_captions_and_several_captions_per_image(tmp_path, shapes_exported):
    """--existing append / prepend join the new caption to the file's text; --skip-existing and --overwrite are
    its aliases; --captions-per-image writes one sampled caption per line, all of them in --jsonl."""
    model = shapes_exported("fp32")
    data = scene_folder(tmp_path / "data", 3, seed=5)
    names = [f"{i}.txt" for i in range(3)]

    def run(*args) -> None:
        done = palionnx("caption", data, "--model", model, "-q", *args)
        assert done.returncode == 0, done.stderr

    def texts() -> list[str]:
        return [(data / name).read_text() for name in names]

    run("--prompt", TAGS_PROMPT)
    tags = texts()
    run("--output-dir", tmp_path / "plain")
    plain = [(tmp_path / "plain" / name).read_text() for name in names]
    run("--existing", "append")
    assert texts() == [f"{t}, {c}" for t, c in zip(tags, plain)]
    run("--skip-existing")
    assert texts() == [f"{t}, {c}" for t, c in zip(tags, plain)]
    run("--overwrite", "--prompt", TAGS_PROMPT)
    assert texts() == tags
    run("--existing", "prepend", "--separator", " | ")
    assert texts() == [f"{c} | {t}" for t, c in zip(tags, plain)]

    jsonl = tmp_path / "run.jsonl"
    run("--overwrite", "--captions-per-image", 3, "--temperature", 0.7, "--seed", 0, "--jsonl", jsonl)
    records = {Path(r["output"]).name: r for r in map(json.loads, jsonl.read_text().splitlines())}
    for name, text in zip(names, texts()):
        lines = text.split("\n")
        assert len(lines) == 3 and all(lines) and records[name]["captions"] == lines
        assert records[name]["caption"] == text and records[name]["attempts"] == 3

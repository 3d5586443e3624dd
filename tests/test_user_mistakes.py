"""A user's mistake (damaged model folder, odd input, odd option) is one clear line and the right
exit code, never a traceback; nothing is lost. Real folders, real `palionnx` subprocesses."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import captions, palionnx
from PIL import Image

from palionnx.runtime.contract import MANIFEST_NAME
from palionnx.samples import sample_images


def images(root: Path, count: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(sample_images(count, size=40)):
        image.save(root / f"{i}.png")
    return root


def one_error(run, *words) -> str:
    """The run failed in one line that holds `words`, with no traceback; return that line."""
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def loaded(run) -> bool:
    """Whether the run got as far as loading the model (it says "model FOLDER (level) on PROVIDER")."""
    return any(line.startswith("model ") for line in run.stderr.splitlines())


def copy_model(model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    return folder


def edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    text = change(data)
    path.write_text(text if isinstance(text, str) else json.dumps(data))


def readonly_folder(tmp_path: Path) -> Path:
    """A folder nothing can be written into: chmod for a normal user; for root (who ignores modes) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return folder
    if os.access("/sys", os.W_OK) and not _unwritable(Path("/sys")):
        pytest.skip("no read-only folder available here")
    return Path("/sys")


def _unwritable(folder: Path) -> bool:
    try:
        (folder / ".palionnx-probe").touch()
    except OSError:
        return True
    (folder / ".palionnx-probe").unlink()
    return False


# --- model folders ---

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_weights_are_one_line_for_caption_info_and_bench(tmp_path, model, damage):
    folder = copy_model(model, tmp_path)
    data = folder / "decoder.onnx.data"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:1000])
    else:
        data.unlink()
    expected = "has 1000 bytes" if damage == "truncate" else "is missing"
    for command in (["caption", images(tmp_path / "in"), "--model", folder], ["info", folder], ["bench", folder]):
        run = palionnx(*command)
        assert run.returncode == 2, (command, run.stderr)
        one_error(run, "decoder.onnx.data", expected, "export it again")
        assert "benchmarking" not in run.stderr
    assert not list((tmp_path / "in").glob("*.txt"))


def test_info_verify_catches_same_size_corruption(tmp_path, model):
    folder = copy_model(model, tmp_path)
    assert palionnx("info", folder, "--verify").returncode == 0
    data = folder / "vision_encoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100:104] = bytes(4 - i for i in range(4))  # same size, different bytes
    data.write_bytes(bytes(raw))
    assert palionnx("info", folder).returncode == 0  # sizes alone cannot see it
    run = palionnx("info", folder, "--verify")
    assert run.returncode == 2
    one_error(run, "vision_encoder.onnx.data", "SHA-256")


class Raw(str):
    """A manifest replaced by this text."""


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: Raw("{not json"), ["not valid JSON"]),
    (lambda d: Raw(""), ["not valid JSON"]),
    (lambda d: Raw("[1, 2]"), ["must hold a JSON object"]),
    (lambda d: d.pop("hidden"), ["field 'hidden' is missing", "export the model again"]),
    (lambda d: d.update(colour="blue"), ["unknown field 'colour'", "export the model again"]),
    (lambda d: d.update(colour="blue", palionnx_version="99.0"), ["unknown field 'colour'", "upgrade palionnx"]),
    (lambda d: d.update(schema_version=99), ["newer palionnx", "upgrade palionnx"]),
    (lambda d: d.pop("graphs"), ["field 'graphs' is missing"]),
    (lambda d: d.update(kv_dtype="int3"), ["kv_dtype 'int3'"]),
    (lambda d: d.update(layers=3), ["inputs are not those palionnx.json lists for 3 layers"]),
    (lambda d: d.update(head_dim=8), ["past_key_values.0.key has shape"]),
    (lambda d: d.update(resample="sinc"), ["resample 'sinc'"]),
    (lambda d: d.update(image_token_id=10**6), ["image_token_id", "outside the vocabulary"]),
])
def test_broken_manifest_is_one_line_naming_the_field(tmp_path, model, change, words):
    folder = copy_model(model, tmp_path)
    edit_manifest(folder, change)
    run = palionnx("caption", images(tmp_path / "in"), "--model", folder)
    assert run.returncode == 2
    one_error(run, *words)
    assert not loaded(run)


def test_garbage_tokenizer_is_one_line(tmp_path, model):
    folder = copy_model(model, tmp_path)
    (folder / "tokenizer.json").write_text("garbage" + " " * 100)  # keep it different from its recorded size
    edit_manifest(folder, lambda d: d["files"]["tokenizer.json"].update(size=107))
    run = palionnx("caption", images(tmp_path / "in"), "--model", folder)
    assert run.returncode == 2
    one_error(run, "tokenizer.json", "not a readable tokenizer")


@pytest.mark.parametrize("given", ["models/pg-int4", "./pg-int4", "~/no-such-palionnx-model", "file"])
def test_model_path_typo_is_no_model_folder_and_leaves_no_cache(tmp_path, model, given):
    (tmp_path / "models").mkdir()
    (tmp_path / "file").write_text("not a model")
    cache = tmp_path / "cache"
    run = palionnx("caption", images(tmp_path / "in"), "--model", given, cwd=tmp_path,
                   env={"PALIONNX_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2
    one_error(run, "--model takes" if given == "file" else "no model folder at")
    assert "exporting" not in run.stderr and not cache.exists()


def test_bench_reports_every_broken_folder_before_measuring(tmp_path, model):
    broken = copy_model(model, tmp_path)
    (broken / "vision_encoder.onnx.data").unlink()
    run = palionnx("bench", model, broken, tmp_path / "nowhere", "--images", 1, "--max-new-tokens", 2)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "vision_encoder.onnx.data" in errors[0] and "nowhere" in errors[1]
    assert "benchmarking" not in run.stderr


def test_export_refuses_a_file_and_a_foreign_folder_and_leaves_nothing_on_failure(tmp_path, checkpoints):
    target = tmp_path / "out"
    target.write_text("a file")
    run = palionnx("export", checkpoints["tiny-pg1"], "-o", target)
    assert run.returncode == 2
    one_error(run, "not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    run = palionnx("export", checkpoints["tiny-pg1"], "-o", foreign)
    assert run.returncode == 2 and (foreign / "notes.txt").read_text() == "mine"
    one_error(run, "not a palionnx model folder")

    broken = tmp_path / "broken-checkpoint"
    shutil.copytree(checkpoints["tiny-pg1"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # the config reads fine; loading the weights fails
    out = tmp_path / "new" / "model"
    run = palionnx("export", broken, "-o", out)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert not (tmp_path / "new").exists()  # no output folder, no staging folder, no created parent


def test_export_refuses_a_head_dim_the_fused_attention_cannot_run(tmp_path):
    """GroupQueryAttention needs head_dim % 8 == 0: such a checkpoint is refused before any graph is written,
    not exported to fail at the first caption."""
    from dataclasses import replace

    from palionnx.testmodels.synth import GEOMETRIES, write_checkpoint

    cases = [(12, "fp32", "needs a multiple of 8"), (264, "fp16", "CUDA GroupQueryAttention takes at most 256")]
    for head_dim, quant, says in cases:
        checkpoint = write_checkpoint(replace(GEOMETRIES["tiny-pg1"], head_dim=head_dim), tmp_path / f"h{head_dim}")
        run = palionnx("export", checkpoint, "-o", tmp_path / "out", "--quant", quant)
        assert run.returncode == 2, run.stderr
        one_error(run, f"text_config.head_dim is {head_dim}", says)
        assert not (tmp_path / "out").exists() and "vision encoder" not in run.stderr


def test_export_refuses_a_checkpoint_this_machine_cannot_hold_before_any_work(tmp_path, checkpoints):
    """The export plan (cli/export_plan.py) of a local checkpoint: what it costs is said, and a level whose folder
    this disk cannot hold is refused in one line with the numbers, before the vision export."""
    big = tmp_path / "big"
    shutil.copytree(checkpoints["tiny-pg1"], big)
    with open(big / "padding.safetensors", "wb") as padding:  # sparse: 4 TB (1000 B float32) taking no disk
        padding.truncate(4000 * 10**9)
    run = palionnx("export", big, "-o", tmp_path / "out", "--quant", "fp32")
    assert run.returncode == 2, run.stderr
    one_error(run, f"cannot export {big} at fp32 on this machine: the export needs about", "of disk and")
    assert "needs: local checkpoint; export of a 1000.00 B-parameter" in run.stderr
    assert "vision encoder" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_quantized_exports_follow_the_umask(exported):
    umask = os.umask(0)
    os.umask(umask)
    for quant in ("int4", "fp32"):
        folder = exported("tiny-pg1", quant)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes


# --- inputs and outputs ---

def test_symlink_and_its_target_both_get_captions(tmp_path, model):
    data = images(tmp_path / "data", 2)
    (data / "link.png").symlink_to(data / "0.png")
    jsonl = tmp_path / "run.jsonl"
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 8, "--jsonl", jsonl)
    assert run.returncode == 0, run.stderr
    written = captions(data)
    assert set(written) == {"0.txt", "1.txt", "link.txt"} and written["link.txt"] == written["0.txt"]
    records = {Path(r["path"]).name: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert set(records) == {"0.png", "1.png", "link.png"}
    assert records["link.png"]["timings"] == records["0.png"]["timings"]  # one model run for both paths


def test_same_stem_is_a_reported_name_clash_not_an_error_forever(tmp_path, model):
    data = tmp_path / "data"
    data.mkdir()
    sample_images(1, 40)[0].save(data / "a.gif")
    sample_images(2, 40)[1].save(data / "a.webp")
    jsonl = tmp_path / "run.jsonl"
    for attempt in range(2):
        run = palionnx("caption", data, "--model", model, "--max-new-tokens", 6, "--jsonl", jsonl)
        assert run.returncode == 0, run.stderr
        clash = [line for line in run.stderr.splitlines() if "a.webp" in line]
        assert len(clash) == 1 and clash[0].startswith("warning:") and "a.gif" in clash[0]
        lines = run.stderr.splitlines()
        if attempt == 0:  # reported before the model loads, and in the summary
            assert lines.index(clash[0]) < next(i for i, line in enumerate(lines) if line.startswith("model "))
        assert "1 name clash" in lines[-1]
    assert set(captions(data)) == {"a.txt"}
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted((Path(r["path"]).name, r["status"]) for r in records) == [("a.gif", "captioned"),
                                                                          ("a.webp", "clash")]


def test_caption_path_that_is_a_folder_is_an_error_for_that_image(tmp_path, model):
    data = images(tmp_path / "data", 2)
    (data / "0.txt").mkdir()
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 6)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if "0.txt" in line and line.startswith("error:")]
    assert (data / "1.txt").is_file() and (data / "0.txt").is_dir()


def test_unwritable_outputs_are_refused_before_the_model_loads(tmp_path, model):
    data = images(tmp_path / "data", 1)
    (tmp_path / "a-folder").mkdir()
    ro = readonly_folder(tmp_path)
    cases = [
        (["--jsonl", tmp_path / "a-folder"], "is a folder"),
        (["--jsonl", tmp_path / "missing" / "run.jsonl"], "does not exist"),
        (["--jsonl", ro / "run.jsonl"], "not writable"),
        (["--output-dir", ro / "captions"], "not writable"),
        (["--output-dir", ro / "captions", "--existing", "append"], "not writable"),
        (["--parquet", tmp_path / "a-folder"], "is a folder"),
    ]
    for args, words in cases:
        run = palionnx("caption", data, "--model", model, *args)
        assert run.returncode == 2, (args, run.stderr)
        one_error(run, words)
        assert not loaded(run)
    assert not (data / "0.txt").exists()


def test_unwritable_image_folder_is_refused_before_the_model_loads(tmp_path, model):
    if os.geteuid() == 0:
        pytest.skip("root writes into any folder it owns; the --output-dir case covers read-only mounts")
    data = images(tmp_path / "data", 1)
    data.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        run = palionnx("caption", data, "--model", model)
    finally:
        data.chmod(stat.S_IRWXU)
    assert run.returncode == 2
    one_error(run, "not writable", "--output-dir")


def test_glob_without_matches_is_a_usage_error_like_a_missing_path(tmp_path, model):
    for given in ["nope/**/*.png", str(tmp_path / "*.png"), str(tmp_path / "missing")]:
        run = palionnx("caption", given, "--model", model, cwd=tmp_path)
        assert run.returncode == 2, given
        one_error(run, given)


def test_decompression_bomb_sized_image_is_one_line_in_our_words(tmp_path, model):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (9500, 9500), 128).save(data / "huge.png")  # 90 Mpx: above Pillow's warning size
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 4)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "huge.png" in line and "megapixels" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:")
    assert "DecompressionBomb" not in run.stderr and "Traceback" not in run.stderr
    assert (data / "huge.txt").is_file()


# --- options ---

@pytest.mark.parametrize(("args", "words"), [
    (["--seed", "-1"], ["--seed"]),
    (["--repetition-penalty", "0"], ["--repetition-penalty"]),
    (["--repetition-penalty", "nan"], ["--repetition-penalty must be a finite number"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", "1e-45"], ["--temperature must be 0 (greedy) or between 0.01 and 2"]),
    (["--temperature", "0.7", "--top-p", "nan"], ["--top-p"]),
    (["--top-k", "5"], ["--top-k", "--temperature"]),
    (["--top-p", "0.9", "--seed", "3"], ["--top-p, --seed", "--temperature"]),
    (["--max-new-tokens", "100000"], ["context of 8192", "at most"]),
    (["--prompt", "<image><bos><eos>"], ["special token <image>"]),
    (["--prompt", "word " * 5000], ["more than the model's context"]),
    (["--prompt", "word " * 500, "--max-memory", "0.01"], ["needs about", "--max-memory"]),
    (["--ext", ".md"], ["--ext"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--clean", "--clean-style", "fancy"], ["--clean-style must be basic or origin, got 'fancy'"]),
    (["--clean=fancy"], ["--clean-style must be basic or origin, got 'fancy'"]),
    (["--keep", "first"], ["--keep must be longest or last"]),
    (["--retry-words", "no_parallel", "--retries", "3"], ["need sampling"]),
    (["--exclude-tags", "@/no/such/tags.txt"], ["--exclude-tags /no/such/tags.txt: cannot read the tag file"]),
    (["--tag-underscores", "camel"], ["--tag-underscores must be keep, spaces, drop"]),
    (["--existing", "merge"], ["--existing must be skip, overwrite, append, prepend, got 'merge'"]),
    (["--overwrite", "--existing", "append"], ["--overwrite contradicts --existing append"]),
    (["--captions-per-image", "3"], ["--captions-per-image needs sampling"]),
    (["--captions-per-image", "0", "--temperature", "0.7"], ["--captions-per-image"]),
    (["--existing", "prepend", "--ray", "local"], ["--existing prepend is not available with --ray"]),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, model, args, words):
    data = images(tmp_path / "data", 1)
    run = palionnx("caption", data, "--model", model, *args)
    assert run.returncode == 2, run.stderr
    one_error(run, *words)
    assert not (data / "0.txt").exists()


def test_the_default_batch_shrinks_to_the_memory(tmp_path, model):
    """No --batch-size: the default batch halves until the request fits --max-memory (a given one never does)."""
    from palionnx.runtime.limits import request_bytes
    from palionnx.runtime.manifest import Manifest
    from palionnx.runtime.text import TextCodec

    data = images(tmp_path / "data", 8)
    manifest = Manifest.load(model)
    prompt = len(TextCodec(model, manifest).prompt_ids("caption en"))
    limit = (request_bytes(manifest, 2, prompt, 4) + request_bytes(manifest, 4, prompt, 4)) / 2 / 1e9
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 4, "--max-memory", f"{limit:.9f}")
    assert run.returncode == 0, run.stderr
    assert "batch 2 (the default 32 needs more memory than is free)" in run.stderr
    assert len(captions(data)) == 8
    given = palionnx("caption", data, "--model", model, "--max-new-tokens", 4, "--max-memory", f"{limit:.9f}",
                     "--batch-size", 8, "--overwrite")
    assert given.returncode == 2 and "lower --batch-size" in given.stderr


def test_long_prompt_within_limits_runs(tmp_path, model):
    data = images(tmp_path / "data", 1)
    run = palionnx("caption", data, "--model", model, "--prompt", "word " * 200, "--max-new-tokens", 4, "--jsonl",
                   tmp_path / "run.jsonl")
    assert run.returncode == 0, run.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert record["status"] == "captioned" and record["error"] is None and 1 <= record["tokens"] <= 4
    assert (data / "0.txt").read_text() == record["caption"]


def test_quiet_prints_nothing_on_success(tmp_path, model):
    data = images(tmp_path / "data", 2)
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 4, "-q")
    assert run.returncode == 0 and run.stderr == "" and run.stdout == ""
    assert len(captions(data)) == 2

"""The `palionnx` command, run for real in subprocesses on folders the tests build."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BAD, GOOD, captions, make_dataset, palionnx  # noqa: F401

from palionnx.jobs.claims import CLAIM_SUFFIX
from palionnx.jobs.cleanup import clean_caption
from palionnx.jobs.files import TEMP_SUFFIX
from palionnx.samples import sample_images


def test_caption_folder_end_to_end(tmp_path, model):
    data = make_dataset(tmp_path / "data")
    (data / "d.txt").write_text("hand-written caption")
    jsonl = tmp_path / "run.jsonl"
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 12, "--jsonl", jsonl,
                   "--prefix", "sks, ", "--suffix", ", best quality")
    assert run.returncode == 1, run.stderr  # some images failed
    assert "Traceback" not in run.stderr
    written = captions(data)
    expected = {str(Path(n).with_suffix(".txt")) for n in GOOD}
    assert set(written) == expected
    assert written["d.txt"] == "hand-written caption"  # existing caption skipped, untouched
    for name, text in written.items():
        if name != "d.txt":
            assert text.startswith("sks, ") and text.endswith(", best quality") and len(text) > 20
    for name in BAD:
        assert sum(name in line for line in run.stderr.splitlines()) == 1, run.stderr
    assert "9 captioned, 1 skipped, 3 failed" in run.stderr

    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 12
    by_name = {Path(r["path"]).name: r for r in records}
    assert by_name["empty.png"]["error"] and by_name["empty.png"]["caption"] is None
    assert by_name["a.png"]["caption"] == written["a.txt"] and by_name["a.png"]["tokens"] > 0
    assert set(by_name["a.png"]["timings"]) == {"vision_s", "prefill_s", "decode_ms_per_token"}

    again = palionnx("caption", data, "--model", model, "--max-new-tokens", 12, "--overwrite")
    assert again.returncode == 1
    assert captions(data)["d.txt"] != "hand-written caption"
    assert "10 captioned, 0 skipped, 3 failed" in again.stderr


def test_output_dir_ext_and_no_recursive(tmp_path, model):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 6, "--output-dir", out,
                   "--ext", ".caption", "--quiet")
    assert run.returncode == 1
    assert set(captions(out, ".caption")) == {str(Path(n).with_suffix(".caption")) for n in GOOD}
    assert not list(data.rglob("*.caption"))
    assert "[1/" not in run.stderr  # quiet: no progress lines, errors only

    flat = palionnx("caption", data, "--model", model, "--max-new-tokens", 6, "--no-recursive")
    assert not list((data / "nested").rglob("*.txt")) and (data / "a.txt").exists()
    assert flat.returncode == 1


def test_greedy_captions_are_deterministic_and_match_the_api(tmp_path, model):
    from palionnx import Captioner

    data = tmp_path / "data"
    data.mkdir()
    for i, image in enumerate(sample_images(3, size=40)):
        image.save(data / f"{i}.png")
    assert palionnx("caption", data, "--model", model, "--max-new-tokens", 10).returncode == 0
    first = captions(data)
    api = Captioner.load(model, device="cpu").caption(sorted(data.glob("*.png")), max_new_tokens=10)
    assert list(first.values()) == [r.text for r in api]
    assert palionnx("caption", data, "--model", model, "--max-new-tokens", 10, "--overwrite").returncode == 0
    assert captions(data) == first


def _many_images(root: Path, count: int) -> Path:
    root.mkdir()
    for i, image in enumerate(sample_images(count, size=40)):
        image.save(root / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_partial_files_and_resumes(tmp_path, model, sig):
    args = ["--model", model, "--max-new-tokens", 200, "--batch-size", 1]
    reference = _many_images(tmp_path / "reference", 40)
    assert palionnx("caption", reference, *args, "--quiet").returncode == 0
    expected = captions(reference)

    data = _many_images(tmp_path / "data", 40)
    process = subprocess.Popen([sys.executable, "-m", "palionnx", "caption", str(data), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(data.glob("*.txt"))) < 5 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    done = captions(data)
    assert 5 <= len(done) < 40, "the run should have been stopped mid-way"
    assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert "interrupted" in stderr and "Traceback" not in stderr
    leftovers = [p.name for p in data.iterdir() if p.name.startswith(".")]
    if sig == signal.SIGINT:
        assert leftovers == []  # Ctrl-C releases its claims
    else:  # kill -9 can leave the claim of the image in progress (and a temp file): the next run clears them
        assert all(name.endswith((CLAIM_SUFFIX, TEMP_SUFFIX)) for name in leftovers), leftovers
    assert all(expected[name] == text for name, text in done.items())  # no partial caption

    resumed = palionnx("caption", data, *args)
    assert resumed.returncode == 0
    assert f"{40 - len(done)} captioned, {len(done)} skipped, 0 failed" in resumed.stderr
    assert captions(data) == expected
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


def test_offline_hub_model_with_nothing_cached(tmp_path):
    data = _many_images(tmp_path / "data", 1)
    env = {"PALIONNX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    run = palionnx("caption", data, env=env)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "mnemic/paligemma-longprompt-v1-safetensors" in run.stderr and "--model" in run.stderr
    export = palionnx("export", "someone/model", "-o", tmp_path / "x", env=env)
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert [line for line in export.stderr.splitlines() if line.startswith("error:")] == [
        line for line in export.stderr.splitlines() if "someone/model" in line and "error" in line
    ]


def test_usage_errors_exit_2(tmp_path, model):
    sample_images(1)[0].save(tmp_path / "x.png")
    assert palionnx("caption", tmp_path / "missing", "--model", model).returncode == 2
    assert palionnx("caption", tmp_path, "--model", model, "--ext", ".md").returncode == 2
    assert palionnx("caption", tmp_path, "--model", tmp_path).returncode == 2
    assert palionnx("caption", tmp_path, "--model", model, "--device", "tpu").returncode == 2


@pytest.mark.parametrize("command", ["caption", "export", "synth", "info", "bench"])
def test_help_reads_well(command):
    run = palionnx(command, "--help")
    assert run.returncode == 0 and "Traceback" not in run.stderr and not run.stderr
    text = " ".join(run.stdout.split())
    assert text.startswith(f"Usage: palionnx {command} ")  # its usage line first
    examples = text.split("Example", 1)[1]  # "Example:" or "Examples:", then command lines of itself
    assert f"palionnx {command} " in examples
    assert max(map(len, run.stdout.splitlines())) <= 100  # the help's width


def test_synth_export_info_and_bench(tmp_path):
    checkpoint = tmp_path / "ckpt"
    assert palionnx("synth", "tiny-pg2", "-o", checkpoint).returncode == 0
    folder = tmp_path / "int8"
    export = palionnx("export", checkpoint, "-o", folder, "--quant", "int8", "--validate")
    assert export.returncode == 0, export.stderr
    assert "writing the decoder" in export.stderr and "greedy sequences identical" in export.stdout
    info = palionnx("info", folder)
    assert info.returncode == 0 and "level=int8" in info.stdout and "CPUExecutionProvider" in info.stdout
    report = tmp_path / "bench.json"
    bench = palionnx("bench", folder, "--images", 2, "--max-new-tokens", 8, "--repeats", 1, "--json", report)
    assert bench.returncode == 0, bench.stderr
    (row,) = json.loads(report.read_text())
    assert row["quant"] == "int8" and row["decode_ms_per_token"] > 0 and row["peak_rss_mb"] > 0
    assert "decode ms/tok" in bench.stdout


def test_clean_caption_rules():
    assert clean_caption("a cat (maybe) on a [red] mat, with a") == "a cat on a mat"
    assert clean_caption("tags, more tags. a long   sentence that was cut") == "tags, more tags."
    assert clean_caption("no punctuation at all") == "no punctuation at all"
    assert clean_caption("nested (a (b) c) done.") == "nested done."


def test_install_scripts_exist():
    root = Path(__file__).parents[1]
    for script in ("scripts/setup.sh", "scripts/test.sh", "scripts/caption.sh", ".ci/run"):
        assert os.access(root / script, os.X_OK), script
    assert "scripts/test.sh" in (root / ".ci/run").read_text()
    readme = (root / "README.md").read_text()
    assert "scripts/test.sh" in readme and "scripts/caption.sh" in readme
    assert shutil.which("bash")


@pytest.mark.parametrize("command", [["caption", "--model"], ["bench"], ["eval"]])
def test_bf16_folder_on_the_cpu_is_one_line_exit_2(command, exported, tmp_path):
    """A bf16 folder (CUDA only) run on a machine without CUDA: one line naming the problem, exit 2."""
    folder = exported("tiny-pg1", "bf16")
    images = tmp_path / "images"
    images.mkdir()
    sample_images(1, size=40)[0].save(images / "a.png")
    args = [*command, folder] + ([images] if command[0] == "caption" else [])
    if command[0] == "bench":
        args += ["--max-new-tokens", 2]
    run = palionnx(*args)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert run.returncode == 2 and errors and "CUDA only" in errors[-1] and "Traceback" not in run.stderr

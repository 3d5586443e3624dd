"""`palionnx caption --ray local`: a local Ray instance (2 CPUs) gives the same outputs as a plain run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from palionnx.jobs.files import TEMP_SUFFIX

pytest.importorskip("ray.data")

from helpers import BAD, captions, make_dataset, palionnx  # noqa: E402

RAY_ENV = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
RAY = ["--ray", "local", "--cpus-per-worker", "0.5"]  # 2 CPUs here: leave one for the reading tasks


def test_ray_run_matches_plain_run(tmp_path, model):
    plain = make_dataset(tmp_path / "plain")
    (plain / "d.txt").write_text("hand-written caption")
    distributed = tmp_path / "ray"
    shutil.copytree(plain, distributed)
    args = ["--model", model, "--max-new-tokens", 10, "--batch-size", 1]
    expected = palionnx("caption", plain, *args, "--jsonl", tmp_path / "plain.jsonl")
    run = palionnx("caption", distributed, *args, *RAY, "--workers", 2,
                   "--jsonl", tmp_path / "ray.jsonl", "--parquet", tmp_path / "ray.parquet", env=RAY_ENV)
    assert run.returncode == expected.returncode == 1, run.stderr
    assert captions(distributed) == captions(plain)
    assert (distributed / "d.txt").read_text() == "hand-written caption"
    assert "9 captioned, 1 skipped, 3 failed" in run.stderr
    for name in BAD:
        assert any(name in line and "error" in line for line in run.stderr.splitlines())

    def records(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return sorted((Path(r["path"]).name, r["caption"], r["tokens"], bool(r["error"])) for r in rows)

    assert records(tmp_path / "ray.jsonl") == records(tmp_path / "plain.jsonl")
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "ray.parquet").num_rows == 12


def _actor_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "CaptionActor" in line and "ps -eo" not in line]


def test_killed_worker_loses_nothing_and_writes_nothing_twice(tmp_path, model):
    from palionnx.samples import sample_images

    reference, data = tmp_path / "reference", tmp_path / "data"
    for folder in (reference, data):
        folder.mkdir()
        for i, image in enumerate(sample_images(24, size=40)):
            image.save(folder / f"{i:03d}.png")
    args = ["--model", model, "--max-new-tokens", 150, "--batch-size", 1]
    assert palionnx("caption", reference, *args, "--quiet").returncode == 0

    process = subprocess.Popen(
        [sys.executable, "-m", "palionnx", "caption", str(data), *map(str, args), *RAY,
         "--jsonl", str(tmp_path / "run.jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **RAY_ENV},
    )
    deadline = time.time() + 180
    while (len(list(data.glob("*.txt"))) < 3 or not _actor_pids()) and time.time() < deadline:
        time.sleep(0.05)
    killed = _actor_pids()
    assert killed, "no captioning actor found"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert captions(data) == captions(reference)
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(p.name for p in data.glob("*.png"))
    assert not [p for p in data.iterdir() if p.name.endswith(TEMP_SUFFIX)]

    again = palionnx("caption", data, *args, *RAY, env=RAY_ENV)
    assert again.returncode == 0 and "0 captioned, 24 skipped, 0 failed" in again.stderr


def test_ray_missing_says_how_to_install(tmp_path, model):
    """Without Ray installed, --ray is a usage error naming the extra to install."""
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    (tmp_path / "x.png").write_bytes(b"")
    env = {"PYTHONPATH": f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = palionnx("caption", tmp_path, "--model", model, "--ray", "local", env=env)
    assert run.returncode == 2 and "pip install 'palionnx[ray]'" in run.stderr and "Traceback" not in run.stderr


def test_ray_refuses_a_bad_prompt_before_starting_ray(tmp_path, model):
    from palionnx.samples import sample_images

    sample_images(1)[0].save(tmp_path / "x.png")
    run = palionnx("caption", tmp_path, "--model", model, *RAY, "--prompt", "<image> caption", env=RAY_ENV)
    assert run.returncode == 2 and "special token <image>" in run.stderr and "Traceback" not in run.stderr
    assert "on Ray" not in run.stderr


def test_ray_captions_short_captions_again(tmp_path, model):
    """--min-words / --retries act in the Ray actors as in a plain run: 6 tokens never make 50 words, so every
    image is captioned 1 + 2 times, and --jsonl says so."""
    data = tmp_path / "data"
    make_dataset(data)
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 6, "--temperature", 0.7, "--seed", 0,
                   "--min-words", 50, "--retries", 2, *RAY, "--jsonl", tmp_path / "ray.jsonl", env=RAY_ENV)
    assert run.returncode == 1, run.stderr  # the broken files fail, as in a plain run
    rows = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert sorted(r["attempts"] for r in rows if r["status"] == "captioned") == [3] * (len(rows) - len(BAD))
    assert all(r["attempts"] == 1 for r in rows if r["status"] == "failed")

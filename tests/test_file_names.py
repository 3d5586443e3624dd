"""File names the OS allows but text does not: bytes that are not UTF-8, and names near the 255-byte limit.
Every image is captioned, `--jsonl` records the name losslessly, and claim and temp files never outgrow the
limit. Real files, real `palionnx caption` subprocesses."""

import base64
import json
import os
import sys

import pytest
from helpers import palionnx

from palionnx.jobs.claims import claim_path
from palionnx.jobs.files import temp_file
from palionnx.samples import sample_images
from palionnx.system import NAME_MAX, side_file


def _save(path: bytes | str, index: int = 0) -> None:
    image = sample_images(index + 1, 40)[index]
    with open(path, "wb") as handle:
        image.save(handle, format="PNG")


def test_a_name_that_is_not_utf8_is_captioned_and_recorded(tmp_path, exported):
    folder = tmp_path / "in"
    folder.mkdir()
    try:
        _save(os.fsencode(folder) + b"/b\xff.png")
    except OSError as exc:  # a file system that insists on UTF-8 names (macOS's APFS, some network shares)
        pytest.skip(f"this file system refuses non-UTF-8 names ({exc})")
    _save(folder / "a.png", 1)
    jsonl = tmp_path / "run.jsonl"
    for attempt in range(2):  # the re-run skips both, without crashing
        run = palionnx("caption", folder, "--model", exported("tiny-pg1", "fp32"), "--jsonl", jsonl,
                       "--max-new-tokens", 3, "--parquet", tmp_path / f"run{attempt}.parquet")
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert os.path.exists(os.fsencode(folder) + b"/b\xff.txt") and (folder / "a.txt").is_file()
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    odd = next(r for r in records if "path_bytes" in r)
    assert odd["path"].endswith("b\\xff.png") and base64.b64decode(odd["path_bytes"]).endswith(b"/b\xff.png")
    assert base64.b64decode(odd["output_bytes"]).endswith(b"/b\xff.txt") and odd["status"] == "captioned"
    assert len(records) == 2 and "path_bytes" not in next(r for r in records if r is not odd)
    assert not [name for name in os.listdir(os.fsencode(folder)) if name.endswith(b"claim")]


def test_a_name_near_the_limit_is_captioned(tmp_path, exported):
    folder = tmp_path / "in"
    folder.mkdir()
    name = "é" * 60 + "c" * (NAME_MAX - 120 - 4 - 4) + ".png"  # 251 bytes: its .txt is 251, its claim far more
    try:
        _save(folder / name)
    except OSError as exc:
        pytest.skip(f"this file system's names are shorter ({exc})")
    run = palionnx("caption", folder, "--model", exported("tiny-pg1", "fp32"), "--jsonl", tmp_path / "run.jsonl",
                   "--max-new-tokens", 3)
    assert run.returncode == 0, run.stderr
    caption = folder / (name[:-4] + ".txt")
    assert caption.is_file() and sorted(os.listdir(folder)) == sorted([name, caption.name])


def test_side_files_of_long_names_stay_within_the_limit(tmp_path):
    short = tmp_path / "a.txt"
    assert claim_path(short).name == ".a.txt.palionnx-claim" and temp_file(short, 42).name == ".a.txt.42.palionnx-tmp"
    for name in ("x" * 251 + ".txt", "日" * 83 + ".txt", "b\udcff" * 120 + ".txt"):
        target = tmp_path / name
        for side in (claim_path(target), temp_file(target, 4294967295), side_file(target, ".lock"),
                     claim_path(target).with_name(claim_path(target).name + ".break")):
            assert len(os.fsencode(side.name)) <= NAME_MAX, side.name
            assert side.parent == tmp_path and side.name.startswith(".")
        assert claim_path(target) == claim_path(tmp_path / name)  # the same in every process
        assert claim_path(target) != claim_path(tmp_path / (name[:-5] + "y.txt"))  # the hash tells them apart


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9 semantics")
def test_a_killed_run_over_a_long_name_is_recovered(tmp_path, exported):
    """A claim left by a dead run on a long name (shortened claim name) is recovered by the next run."""
    folder = tmp_path / "in"
    folder.mkdir()
    name = "z" * 240 + ".png"
    _save(folder / name)
    target = folder / (name[:-4] + ".txt")
    claim = claim_path(target)
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 999999, "boot": "", "started": 0.0}))
    os.utime(claim, (0, 0))  # long dead
    run = palionnx("caption", folder, "--model", exported("tiny-pg1", "fp32"), "--max-new-tokens", 3)
    assert run.returncode == 0, run.stderr
    assert target.is_file() and not claim.exists()

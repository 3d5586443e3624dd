"""The README is the user's manual: its commands run as written, where they need no network.

Every ```bash block is marked `<!-- readme-test: run -->` or `<!-- readme-test: skip: REASON -->`. The
`run` blocks are run in document order, as written, one command at a time, in a fresh folder holding only
a `.venv` (the test's own environment), offline, with an empty palionnx cache.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks() -> list[tuple[str | None, str, str]]:
    return [(m["mark"], m["lang"], m["body"]) for m in BLOCK.finditer(README)]


def commands(body: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_every_shell_block_says_whether_it_runs():
    marks = [(mark, body.splitlines()[0]) for mark, lang, body in blocks() if lang in ("bash", "python")]
    unmarked = [first for mark, first in marks if mark is None]
    assert not unmarked, f"mark these README blocks run or skip: {unmarked}"
    assert all(mark == "run" or mark.startswith("skip: ") and len(mark) > 10 for mark, _ in marks)
    assert any(mark == "run" for mark, _ in marks)


def test_the_two_fresh_machine_commands_come_first_and_ci_runs_the_test_command():
    first = next(body for _, lang, body in blocks() if lang == "bash")
    run, test = commands(first)
    assert run.startswith("scripts/caption.sh") and test == "scripts/test.sh"
    assert README.index("## Two commands on a fresh machine") < README.index("## Install")
    assert test in (ROOT / ".ci/run").read_text()


def test_runnable_blocks_run_as_written(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("the README's commands activate a virtual environment; these tests run outside one")
    (tmp_path / ".venv").symlink_to(venv)
    env = {**os.environ, "PALIONNX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": ""}
    script = [f"cd {tmp_path}", "set -e"]
    for mark, lang, body in blocks():
        if mark == "run" and lang == "bash":
            script += commands(body)
    run = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert len(list((tmp_path / "input").glob("*.txt"))) == 4  # the walkthrough captioned its sample images
    assert (tmp_path / "run.jsonl").read_text().count('"status": "captioned"') == 4
    exported = [f for f in (tmp_path / "models/tiny-int4").iterdir() if f.name != "palionnx.json"]
    assert f"all {len(exported)} files match their SHA-256" in run.stdout

"""Several `palionnx caption` runs on one folder share the work: every image captioned by exactly one run,
results identical to a single run, each run's --jsonl listing what it did; kill -9 loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import captions, palionnx

from palionnx.jobs.claims import CLAIM_SUFFIX, claim_path
from palionnx.samples import sample_images
from palionnx.system import ProcessId

COUNT = 48
ARGS = ["--max-new-tokens", 120, "--batch-size", 1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, exported):
    """The captions a single run writes."""
    folder = make_images(tmp_path_factory.mktemp("single") / "data")
    run = palionnx("caption", folder, "--model", exported("tiny-pg1", "fp32"), *ARGS, "-q")
    assert run.returncode == 0, run.stderr
    return captions(folder)


def make_images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(sample_images(COUNT, size=40)):
        image.save(folder / f"{i:03d}.png")
    return folder


def start(folder: Path, model: Path, jsonl: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "palionnx", "caption", str(folder), "--model", str(model), *map(str, ARGS),
               "--jsonl", str(jsonl), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(jsonls: list[Path]) -> list[str]:
    """Image names recorded as captioned, over all the runs' --jsonl files."""
    names = []
    for path in jsonls:
        if path.exists():
            names += [Path(r["path"]).name for r in map(json.loads, path.read_text().splitlines())
                      if r["status"] == "captioned"]
    return names


def wait_for_captions(folder: Path, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(list(folder.glob("*.txt"))) < count and time.time() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("runs", [2, 3])
def test_concurrent_runs_share_the_folder(tmp_path, model, reference, runs):
    data = make_images(tmp_path / "data")
    jsonls = [tmp_path / f"run{i}.jsonl" for i in range(runs)]
    processes = [start(data, model, jsonl) for jsonl in jsonls]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0] * runs, [err for _, err in outputs]
    assert captions(data) == reference
    done = records(jsonls)
    assert sorted(done) == sorted(f"{i:03d}.png" for i in range(COUNT))  # each image once, over all runs
    per_run = [len(records([jsonl])) for jsonl in jsonls]
    assert sum(1 for n in per_run if n) >= 2, per_run  # the work was shared, not done by one run alone
    for (_, stderr), n in zip(outputs, per_run):
        assert f"{n} captioned" in stderr.splitlines()[-1]
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


def test_a_killed_run_is_taken_over_by_the_others(tmp_path, model, reference):
    data = make_images(tmp_path / "data")
    jsonls = [tmp_path / f"run{i}.jsonl" for i in range(3)]
    processes = [start(data, model, jsonl) for jsonl in jsonls]
    wait_for_captions(data, 10)
    processes[0].kill()
    processes[0].wait()  # reaped, as a shell would
    outputs = [process.communicate(timeout=300) for process in processes[1:]]
    assert [p.returncode for p in processes[1:]] == [0, 0], [err for _, err in outputs]
    assert captions(data) == reference
    assert sorted(records(jsonls)) == sorted(f"{i:03d}.png" for i in range(COUNT))
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


def test_kills_and_reruns_keep_one_jsonl_record_per_image(tmp_path, model, reference):
    data = make_images(tmp_path / "data")
    jsonl = tmp_path / "run.jsonl"
    for target in (8, 20, 32):
        process = start(data, model, jsonl)
        wait_for_captions(data, target)
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = palionnx("caption", data, "--model", model, *ARGS, "--jsonl", jsonl)
    assert final.returncode == 0, final.stderr
    assert captions(data) == reference
    assert sorted(records([jsonl])) == sorted(f"{i:03d}.png" for i in range(COUNT))
    assert len(jsonl.read_text().splitlines()) == COUNT


def test_kills_and_reruns_of_an_append_add_to_each_image_once(tmp_path, model, reference):
    """--existing append killed three times, then run to the end: each caption file holds its old text and
    one new caption, and --jsonl one record per image."""
    data = make_images(tmp_path / "data")
    old = {f"{i:03d}.txt": f"old {i}" for i in range(COUNT)}
    for name, text in old.items():
        (data / name).write_text(text)
    jsonl = tmp_path / "run.jsonl"
    for target in (8, 20, 32):
        process = start(data, model, jsonl, "--existing", "append")
        deadline = time.time() + 120
        while sum(captions(data)[name] != text for name, text in old.items()) < target and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = palionnx("caption", data, "--model", model, *ARGS, "--jsonl", jsonl, "--existing", "append")
    assert final.returncode == 0, final.stderr
    assert captions(data) == {name: f"{old[name]}, {reference[name]}" for name in old}
    assert sorted(records([jsonl])) == sorted(f"{i:03d}.png" for i in range(COUNT))
    assert len(jsonl.read_text().splitlines()) == COUNT
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


def test_concurrent_appending_runs_add_once_between_them(tmp_path, model, reference):
    data = make_images(tmp_path / "data")
    for i in range(COUNT):
        (data / f"{i:03d}.txt").write_text(f"old {i}")
    jsonls = [tmp_path / f"run{i}.jsonl" for i in range(2)]
    processes = [start(data, model, jsonl, "--existing", "append") for jsonl in jsonls]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    assert captions(data) == {name: f"old {int(name[:3])}, {text}" for name, text in reference.items()}
    assert sorted(records(jsonls)) == sorted(f"{i:03d}.png" for i in range(COUNT))
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


def dead_process() -> ProcessId:
    """The identity of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    pid = int(child.communicate()[0])
    return ProcessId(ProcessId.current().host, pid, 1.0)


def test_a_caption_written_just_before_a_kill_gets_its_record(tmp_path, model):
    """The window the issue saw (39 records for 40 images): the caption renamed into place, then kill -9
    before the --jsonl line. The claim still holds the line; the next run appends it."""
    data = tmp_path / "data"
    data.mkdir()
    sample_images(1, 40)[0].save(data / "a.png")
    sample_images(2, 40)[1].save(data / "b.png")
    (data / "a.txt").write_text("caption of a")
    jsonl = tmp_path / "run.jsonl"
    line = json.dumps({"path": str(data / "a.png"), "status": "captioned", "tokens": 3, "error": None,
                       "output": str(data / "a.txt"), "caption": "caption of a", "timings": {}})
    claim_path(data / "a.txt").write_text(json.dumps(
        {"owner": dead_process().to_json(), "jsonl": str(jsonl.resolve()), "line": line}))
    run = palionnx("caption", data, "--model", model, "--max-new-tokens", 6, "--jsonl", jsonl)
    assert run.returncode == 0, run.stderr
    rows = jsonl.read_text().splitlines()
    assert rows[0] == line and len(rows) == 2 and json.loads(rows[1])["path"].endswith("b.png")
    assert (data / "a.txt").read_text() == "caption of a"
    assert not list(data.glob(f".*{CLAIM_SUFFIX}"))


def test_a_live_claim_is_left_to_its_owner(tmp_path, model):
    """An image another live run holds is not captioned twice: this run waits for the owner to finish it."""
    data = tmp_path / "data"
    data.mkdir()
    sample_images(1, 40)[0].save(data / "a.png")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = ProcessId.current()
        claim = claim_path(data / "a.txt")
        claim.write_text(json.dumps({"owner": ProcessId(me.host, owner.pid, None).to_json()}))
        process = subprocess.Popen([sys.executable, "-m", "palionnx", "caption", str(data), "--model", str(model)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(6)
        assert process.poll() is None and not (data / "a.txt").exists()  # still waiting for the owner
        (data / "a.txt").write_text("written by the owner")  # the owner finishes and releases its claim
        claim.unlink()
        _, stderr = process.communicate(timeout=60)
    finally:
        owner.kill()
        owner.wait()
    assert process.returncode == 0, stderr
    assert "waiting for other runs to finish the 1 image(s)" in stderr and "1 done by other runs" in stderr
    assert (data / "a.txt").read_text() == "written by the owner"


def test_taking_over_a_dead_claim_removes_its_half_written_caption(tmp_path):
    """A run killed while writing a caption leaves its temp file; whoever takes the claim over removes it
    (runs already under way never rescan the folder for temp files)."""
    from palionnx.jobs.claims import recover_stale
    from palionnx.jobs.files import TEMP_SUFFIX

    owner = dead_process()
    target = tmp_path / "a [1].txt"
    claim_path(target).write_text(json.dumps({"owner": owner.to_json()}))
    temp = tmp_path / f".{target.name}.{owner.pid}{TEMP_SUFFIX}"
    temp.write_text("half a capt")
    other = tmp_path / f".b.txt.{owner.pid}{TEMP_SUFFIX}"  # another caption's: not this claim's to remove
    other.write_text("x")
    assert recover_stale(claim_path(target), target)
    assert not temp.exists() and not claim_path(target).exists() and other.exists()


def test_taking_over_a_dead_claim_removes_its_half_written_claim_update(tmp_path):
    """A run killed while storing its record in the claim (`store_record`: a temp file of the claim itself)
    leaves that temp file; the takeover removes it too."""
    from palionnx.jobs.claims import recover_stale
    from palionnx.jobs.files import temp_file

    owner = dead_process()
    target = tmp_path / "010.txt"
    claim_path(target).write_text(json.dumps({"owner": owner.to_json()}))
    half = temp_file(claim_path(target), owner.pid)
    half.write_text('{"owner": ')
    assert recover_stale(claim_path(target), target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_claims_of_a_dead_owner_on_this_host_are_stale(tmp_path):
    from palionnx.jobs.claims import ClaimInfo, is_stale

    path = tmp_path / ".a.txt.palionnx-claim"
    path.write_text("{}")
    assert is_stale(path, ClaimInfo(dead_process()))
    assert not is_stale(path, ClaimInfo(ProcessId.current()))
    elsewhere = ProcessId("another-host.invalid", os.getpid(), None)
    assert not is_stale(path, ClaimInfo(elsewhere))  # another host: only after the lease
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert is_stale(path, ClaimInfo(elsewhere))

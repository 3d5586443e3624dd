"""The application layer in process (`palionnx.jobs`): finding images, planning a run, the checks before a
model loads, claims, atomic caption files, records, and whole runs on a numpy-weight model folder."""

import base64
import json
import math
import os
import socket
from pathlib import Path

import pytest
from helpers import captions, make_dataset

from palionnx.jobs.captioning import caption_files, fit_batch, joined, per_image, publish
from palionnx.jobs.checks import CheckError, check_options, check_outputs, memory_limit
from palionnx.jobs.claims import CLAIM_SUFFIX, Claims, claim_path, read_claim
from palionnx.jobs.files import (
    TEMP_SUFFIX,
    ImageJob,
    append_line,
    caption_path,
    find_images,
    temp_file,
    write_atomic,
)
from palionnx.jobs.options import CaptionOptions
from palionnx.jobs.plan import plan_run
from palionnx.jobs.records import Record, Summary
from palionnx.runtime.captioner import Captioner, CaptionResult
from palionnx.runtime.limits import RequestError, request_bytes
from palionnx.samples import sample_images
from palionnx.system import ProcessId


@pytest.fixture(scope="module")
def captioner(numpy_folder) -> Captioner:
    return Captioner.load(numpy_folder("tiny-pg1"), device="cpu")


def _images(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, sample_images(len(names), size=32)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    return root


def _names(jobs, root):
    return [str(job.image.relative_to(root)) for job in jobs]


# --- finding images and naming captions ---------------------------------------------------------------------

def test_find_images_walks_folders_files_and_globs_once_each(tmp_path):
    root = _images(tmp_path / "d", ["b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.png"])
    (root / "notes.md").write_text("not an image")
    assert _names(find_images([str(root)]), root) == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.png"]
    assert _names(find_images([str(root)], recursive=False), root) == ["a.JPG", "b.png"]
    both = find_images([str(root / "sub"), str(root / "sub" / "c.webp"), str(root / "*.png")])
    assert _names(both, root) == ["b.png", "sub/c.webp", "sub/deeper/d.png"]  # c.webp reached twice, once
    with pytest.raises(FileNotFoundError, match="no such file, folder or matching pattern"):
        find_images([str(root / "missing.png")])
    with pytest.raises(FileNotFoundError, match="the pattern matches no file"):
        find_images([str(root / "*.gif")])


def test_caption_paths_sit_beside_or_mirror_under_the_output_dir(tmp_path):
    job = ImageJob(tmp_path / "in" / "sub" / "x.jpeg", tmp_path / "in")
    assert caption_path(job, ".txt", None) == tmp_path / "in" / "sub" / "x.txt"
    assert caption_path(job, ".caption", tmp_path / "out") == tmp_path / "out" / "sub" / "x.caption"


# --- planning -----------------------------------------------------------------------------------------------

def test_plan_skips_captioned_images_unless_overwriting(tmp_path, capsys):
    root = _images(tmp_path / "d", ["a.png", "b.png", "c.png"])
    (root / "a.txt").write_text("kept")
    jobs = find_images([str(root)])
    plan = plan_run(jobs, CaptionOptions())
    assert _names(plan.todo, root) == ["b.png", "c.png"] and plan.summary.skipped == 1
    assert "skipping 1 images that already have a .txt caption" in capsys.readouterr().err
    for mode in ("overwrite", "append", "prepend"):
        again = plan_run(jobs, CaptionOptions(existing=mode))
        assert _names(again.todo, root) == ["a.png", "b.png", "c.png"] and again.summary.skipped == 0
    assert _names(plan_run(jobs, CaptionOptions(ext=".caption")).todo, root) == ["a.png", "b.png", "c.png"]


def test_plan_reports_name_clashes_and_folder_captions_early(tmp_path, capsys):
    root = _images(tmp_path / "d", ["a.gif", "a.webp", "b.png"])
    (root / "b.txt").mkdir()
    plan = plan_run(find_images([str(root)]), CaptionOptions())
    assert _names(plan.todo, root) == ["a.gif"]
    clash, folder = sorted(plan.early, key=lambda record: record.status)
    assert clash.status == "clash" and clash.path.endswith("a.webp") and "belongs to" in clash.error
    assert folder.status == "failed" and "is a folder, not a caption file" in folder.error
    err = capsys.readouterr().err
    assert "warning:" in err and "a.webp" in err and "error:" in err and "b.txt" in err


def test_plan_clears_what_killed_runs_left(tmp_path):
    """A dead writer's temp file goes; a stale claim's stored record reaches its --jsonl once; a live run's
    temp file and claim stay."""
    root = _images(tmp_path / "d", ["a.png", "b.png"])
    jsonl = tmp_path / "run.jsonl"
    dead = ProcessId(socket.gethostname(), os.getpid(), 1.0)  # this pid, another start time: a reused pid
    dead_temp = temp_file(root / "a.txt", 2**22 + 7)  # no such process
    dead_temp.write_text("half a capt")
    (root / "a.txt").write_text("a caption")
    line = json.dumps({"path": str(root / "a.png"), "status": "captioned"})
    claim_path(root / "a.txt").write_text(json.dumps({"owner": dead.to_json(), "jsonl": str(jsonl), "line": line}))
    live_temp = temp_file(root / "b.txt", os.getpid())
    live_temp.write_text("being written")
    live = Claims(None)
    assert live.claim(root / "b.txt")

    plan = plan_run(find_images([str(root)]), CaptionOptions(jsonl=jsonl))
    assert not dead_temp.exists() and not claim_path(root / "a.txt").exists()
    assert jsonl.read_text().splitlines() == [line]
    assert live_temp.exists() and claim_path(root / "b.txt").exists()
    assert _names(plan.todo, root) == ["b.png"] and plan.summary.skipped == 1
    plan_run(find_images([str(root)]), CaptionOptions(jsonl=jsonl))
    assert jsonl.read_text().splitlines() == [line]  # recovered once, not on every plan
    live.release_all()


# --- checks before a model loads ----------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    (CaptionOptions(ext=".md"), "--ext must be .txt or .caption"),
    (CaptionOptions(temperature=math.nan), "--temperature"),
    (CaptionOptions(top_p=1.5, temperature=0.7), "--top-p"),
    (CaptionOptions(seed=3), "only act when sampling"),
    (CaptionOptions(repetition_penalty=math.inf), "--repetition-penalty"),
    (CaptionOptions(min_words=20, temperature=0.7), "--min-words only acts with --retries"),
    (CaptionOptions(retries=3, temperature=0.7), "--retries only acts with --min-words"),
    (CaptionOptions(min_words=20, retries=3), "need sampling"),
    (CaptionOptions(existing="merge"), "--existing must be skip, overwrite, append, prepend"),
    (CaptionOptions(captions_per_image=2), "--captions-per-image needs sampling"),
    (CaptionOptions(captions_per_image=0, temperature=0.7), "--captions-per-image must be at least 1"),
])
def test_contradicting_options_are_one_sentence(options, message):
    with pytest.raises(CheckError, match=message):
        check_options(options)


def test_good_options_pass_their_checks():
    check_options(CaptionOptions(temperature=0.7, top_k=40, top_p=0.9, seed=1, min_words=20, retries=2))
    check_options(CaptionOptions(ext=".caption", repetition_penalty=1.2, no_repeat_ngram_size=3))


def test_outputs_that_cannot_be_written_are_refused(tmp_path):
    root = _images(tmp_path / "d", ["a.png"])
    plan = plan_run(find_images([str(root)]), CaptionOptions())
    check_outputs(CaptionOptions(jsonl=tmp_path / "new.jsonl", output_dir=tmp_path / "not-yet" / "there"), plan)
    (tmp_path / "file").write_text("x")
    for options, message in ((CaptionOptions(jsonl=tmp_path), "is a folder: give a file path"),
                             (CaptionOptions(parquet=tmp_path / "no" / "x.parquet"), "does not exist"),
                             (CaptionOptions(output_dir=tmp_path / "file"), "is a file, not a folder")):
        with pytest.raises(CheckError, match=message):
            check_outputs(options, plan)
    assert not list(tmp_path.rglob(".palionnx-probe-*"))


def test_memory_limit_is_the_option_or_what_is_free():
    assert memory_limit("cpu", 1.5) == 1.5e9
    free = memory_limit("cpu", None)
    assert free is None or free > 0


# --- claims and caption files -------------------------------------------------------------------------------

def test_a_claim_is_held_once_and_names_its_owner(tmp_path):
    target = tmp_path / "a.txt"
    mine, other = Claims(tmp_path / "r.jsonl"), Claims(None)
    assert mine.claim(target) and not other.claim(target)
    info = read_claim(claim_path(target))
    assert info.owner == ProcessId.current() and info.jsonl == str((tmp_path / "r.jsonl").resolve())
    mine.store_record(target, '{"path": "a.png"}')
    assert read_claim(claim_path(target)).line == '{"path": "a.png"}'
    mine.release(target)
    assert not claim_path(target).exists() and other.claim(target)
    other.release_all()
    assert not list(tmp_path.glob(f".*{CLAIM_SUFFIX}"))


def test_a_dead_runs_claim_is_taken_over_and_another_hosts_fresh_one_left(tmp_path):
    dead = ProcessId(socket.gethostname(), os.getpid(), 1.0)
    elsewhere = ProcessId("another-host-" + socket.gethostname(), 1, 1.0)
    for name, owner in (("dead.txt", dead), ("elsewhere.txt", elsewhere)):
        claim_path(tmp_path / name).write_text(json.dumps({"owner": owner.to_json(), "jsonl": None, "line": None}))
    claims = Claims(None)
    assert claims.claim(tmp_path / "dead.txt")
    assert not claims.claim(tmp_path / "elsewhere.txt")  # within its lease: the other host may be running
    claims.release_all()


def test_release_all_keeps_the_record_of_a_published_caption(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    claims = Claims(jsonl)
    for name in ("a.txt", "b.txt"):
        claims.claim(tmp_path / name)
        claims.store_record(tmp_path / name, json.dumps({"path": name}))
    (tmp_path / "a.txt").write_text("published")  # b's caption never came: no record for it
    claims.release_all()
    assert [json.loads(row)["path"] for row in jsonl.read_text().splitlines()] == ["a.txt"]


def test_a_ctrl_c_inside_claim_or_release_leaves_no_claim_file(tmp_path, monkeypatch):
    """The CI trace: a Ctrl-C landing between a claim file's creation (or removal) and the bookkeeping of it;
    the run's `release_all` (its `finally`) then removes the file, and leaves another run's claim alone."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name, step, (module, function) in (("a.txt", "claim", (os, "fdopen")),
                                           ("b.txt", "release", (Path, "unlink"))):
        claims = Claims(None)
        if step == "release":
            assert claims.claim(tmp_path / name)
        with monkeypatch.context() as patch:
            patch.setattr(module, function, interrupted)
            with pytest.raises(KeyboardInterrupt):
                getattr(claims, step)(tmp_path / name)
        assert claim_path(tmp_path / name).exists()
        claims.release_all()
        assert not claim_path(tmp_path / name).exists(), step
    other = tmp_path / "other.txt"  # another run's claim, there as this run's create of it is interrupted
    claim_path(other).write_text(json.dumps({"owner": ProcessId("elsewhere", 1, 1.0).to_json()}))
    claims = Claims(None)
    with monkeypatch.context() as patch:
        patch.setattr(os, "open", interrupted)
        with pytest.raises(KeyboardInterrupt):
            claims.claim(other)
    claims.release_all()
    assert claim_path(other).exists()


def test_write_atomic_leaves_no_temp_and_exclusive_keeps_the_first(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_atomic(target, "first")
    with pytest.raises(FileExistsError):
        write_atomic(target, "second", exclusive=True)
    write_atomic(target, "third")
    assert target.read_text() == "third" and not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))


def test_append_line_ends_a_partial_last_line_first(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"whole": 1}\n{"cut sho')
    with open(path, "a", encoding="utf-8") as handle:
        append_line(handle, '{"next": 2}')
    assert path.read_text().splitlines() == ['{"whole": 1}', '{"cut sho', '{"next": 2}']


def test_records_keep_the_bytes_of_a_name_that_is_not_utf8():
    name = os.fsdecode(b"/d/caf\xe9.png")
    fields = Record(name, output=name[:-4] + ".txt").fields()
    assert fields["path"] == "/d/caf\\xe9.png" and os.fsdecode(base64.b64decode(fields["path_bytes"])) == name
    assert "output_bytes" in fields and json.loads(Record("/d/a.png").line())["path"] == "/d/a.png"


def test_summary_line_says_what_happened():
    assert Summary(captioned=4, skipped=1, elapsed_s=2.0).line() == \
        "4 captioned, 1 skipped, 0 failed in 2.0s (2.00 images/s)"
    stopped = Summary(captioned=1, failed=2, clashes=2, by_others=3, elapsed_s=1.0, interrupted=True).line()
    assert stopped.startswith("stopped early: 1 captioned, 0 skipped, 2 failed, 3 done by other runs, 2 name clashes")
    assert stopped.endswith("re-run the same command to resume")


def test_publish_writes_prefix_clean_caption_suffix_and_refuses_to_overwrite_exclusively(tmp_path):
    result = CaptionResult(source="a.png", text="a red circle (big) on blue, and", tokens=[5, 6, 7])
    options = CaptionOptions(prefix="style, ", suffix=" end", clean=True)
    record = publish([result], tmp_path / "a.txt", options)
    assert (tmp_path / "a.txt").read_text() == "style, a red circle on blue end" == record.caption
    assert record.status == "captioned" and record.tokens == 3 and record.output == str(tmp_path / "a.txt")
    again = publish([CaptionResult(source="a.png", text="other", tokens=[1])], tmp_path / "a.txt", CaptionOptions(),
                    exclusive=True)
    assert again.caption == (tmp_path / "a.txt").read_text() == "style, a red circle on blue end"
    failed = publish([CaptionResult(source="b.png", text="", tokens=[], error="b.png: unreadable")], tmp_path / "b.txt",
                     options)
    assert failed.status == "failed" and not (tmp_path / "b.txt").exists()


def test_joined_puts_the_new_caption_after_or_before_the_existing_text(tmp_path):
    target = tmp_path / "a.txt"
    assert joined(["new"], target, CaptionOptions(existing="append")) == "new"  # no file yet
    target.write_text("  old, tags \n")
    assert joined(["new"], target, CaptionOptions()) == "new"
    assert joined(["new"], target, CaptionOptions(existing="overwrite")) == "new"
    assert joined(["new"], target, CaptionOptions(existing="append")) == "old, tags, new"
    assert joined(["new"], target, CaptionOptions(existing="prepend", separator=" | ")) == "new | old, tags"
    assert joined(["one", "two"], target, CaptionOptions(existing="append")) == "old, tags\none\ntwo"
    assert joined(["one", "two"], target, CaptionOptions()) == "one\ntwo"
    target.write_text(" \n")
    assert joined(["new"], target, CaptionOptions(existing="prepend")) == "new"


def test_publish_appends_and_an_unreadable_existing_caption_is_left_alone(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    record = publish([CaptionResult("a.png", "new", [1])], target, CaptionOptions(existing="append", prefix="p "))
    assert target.read_text() == "old, p new" == record.caption and record.captions == ["p new"]
    target.write_bytes(b"\xff\xfe not utf-8")
    bad = publish([CaptionResult("a.png", "new", [1])], target, CaptionOptions(existing="append"))
    assert bad.status == "failed" and "cannot read the existing caption" in bad.error
    assert target.read_bytes() == b"\xff\xfe not utf-8"


def test_publish_of_several_captions_writes_one_per_line_or_fails_whole(tmp_path):
    results = [CaptionResult("a.png", text, [1, 2], attempts=attempt) for text, attempt in (("x", 1), ("y", 2))]
    record = publish(results, tmp_path / "a.txt", CaptionOptions(suffix="."))
    assert (tmp_path / "a.txt").read_text() == "x.\ny." and record.captions == ["x.", "y."]
    assert record.tokens == 4 and record.attempts == 3 and "captions" not in json.loads(
        publish(results[:1], tmp_path / "b.txt", CaptionOptions()).line())
    failed = publish([results[0], CaptionResult("a.png", error="a.png: out of memory")], tmp_path / "c.txt",
                     CaptionOptions())
    assert failed.status == "failed" and failed.error == "a.png: out of memory" and not (tmp_path / "c.txt").exists()


def test_per_image_gathers_each_tags_results():
    first, second = object(), object()
    stream = [(first, "a1"), (second, "b1"), (first, "a2"), (second, "b2"), (second, "b3"), (first, "a3")]
    assert list(per_image(stream, 3)) == [(second, ["b1", "b2", "b3"]), (first, ["a1", "a2", "a3"])]


def test_a_claim_of_a_published_append_stays_as_its_mark_until_the_run_is_done(tmp_path):
    target = tmp_path / "a.txt"
    claims = Claims(None, marks=True)
    assert claims.claim(target)
    claims.store_record(target, "{}", "old, new")
    target.write_text("old, new")
    claims.release(target)
    assert claim_path(target).exists() and read_claim(claim_path(target)).text == "old, new"
    other = Claims(None, marks=True)
    assert not other.claim(target) and other.done_by_mark(target)  # a live run's mark: done, not busy
    claims.release_all()
    assert claim_path(target).exists()  # interrupted: the mark stays for the re-run
    claims.clear_marks()
    assert not claim_path(target).exists()
    unpublished = tmp_path / "b.txt"
    assert claims.claim(unpublished)
    claims.store_record(unpublished, "{}", "old, never written")
    claims.release(unpublished)
    assert not claim_path(unpublished).exists()


def test_a_mark_holds_a_caption_with_a_carriage_return(tmp_path):
    """A random model can decode "\r": compared as text read back ("\r" read as "\n") the mark was missed
    and a re-run appended to that image twice."""
    target = tmp_path / "a.txt"
    target.write_bytes(b"old\r")
    options = CaptionOptions(existing="append")
    text = joined(["new\rline"], target, options)
    assert text == "old, new\rline"  # the old text stripped, the new one as decoded
    claims = Claims(None, marks=True)
    assert claims.claim(target)
    record = publish([CaptionResult("a.png", "new\rline", [1])], target, options, claims=claims)
    claims.release(target)
    assert target.read_bytes() == text.encode() and record.caption == text
    assert Claims(None, marks=True).done_by_mark(target)


# --- whole runs on a model ----------------------------------------------------------------------------------

def test_a_run_captions_every_good_image_once_and_records_each(tmp_path, captioner, capsys):
    root = make_dataset(tmp_path / "d")
    jsonl = tmp_path / "run.jsonl"
    options = CaptionOptions(jsonl=jsonl, max_new_tokens=4, batch_size=3)
    summary = caption_files(captioner, plan_run(find_images([str(root)]), options), options, quiet=True)
    assert (summary.captioned, summary.failed, summary.skipped) == (10, 3, 0)
    written = captions(root)
    assert len(written) == 10 and all(text for text in written.values())
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(r["status"] for r in records) == ["captioned"] * 10 + ["failed"] * 3
    assert {Path(r["output"]).read_text() for r in records if r["output"]} == set(written.values())
    assert not list(root.rglob(f".*{CLAIM_SUFFIX}")) and not list(root.rglob(f"*{TEMP_SUFFIX}"))

    again = caption_files(captioner, plan_run(find_images([str(root)]), options), options, quiet=True)
    assert (again.captioned, again.skipped, again.failed) == (0, 10, 3) and captions(root) == written
    capsys.readouterr()


def test_a_run_gives_the_captions_of_the_api(tmp_path, captioner):
    root = _images(tmp_path / "d", ["a.png", "b.png", "c.png"])
    options = CaptionOptions(max_new_tokens=6, batch_size=2, output_dir=tmp_path / "out")
    caption_files(captioner, plan_run(find_images([str(root)]), options), options, quiet=True)
    expected = captioner.caption(sorted(root.glob("*.png")), max_new_tokens=6)
    assert [(tmp_path / "out" / f"{n}.txt").read_text() for n in "abc"] == [r.text for r in expected]
    assert not list(root.glob("*.txt"))


def test_a_symbolic_link_gets_its_own_caption_from_one_pass(tmp_path, captioner):
    root = _images(tmp_path / "d", ["a.png"])
    (root / "link.png").symlink_to(root / "a.png")
    options = CaptionOptions(max_new_tokens=4, jsonl=tmp_path / "r.jsonl")
    summary = caption_files(captioner, plan_run(find_images([str(root)]), options), options, quiet=True)
    assert summary.captioned == 2 and (root / "a.txt").read_text() == (root / "link.txt").read_text()
    paths = [json.loads(line)["path"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(Path(p).name for p in paths) == ["a.png", "link.png"]


def test_the_default_batch_halves_to_fit_the_memory(captioner):
    said: list[str] = []
    assert fit_batch(captioner, CaptionOptions(max_memory_gb=100), images=64, say=said.append).batch_size is None
    assert not said  # the default fits: left to the device's default
    model = captioner.model
    prompt_len = captioner.check(["caption en"], 4, 1)
    need = [request_bytes(captioner.manifest, batch, prompt_len, 4, model.min_cache_slots, model.prefill_chunk)
            for batch in (1, 2)]
    assert need[0] < need[1]
    fitted = fit_batch(captioner, CaptionOptions(max_new_tokens=4, max_memory_gb=need[1] / 1e9), images=64,
                       say=said.append)
    assert fitted.batch_size == 2 < captioner.default_batch_size
    assert said == [f"batch 2 (the default {captioner.default_batch_size} needs more memory than is free)"]
    assert fit_batch(captioner, CaptionOptions(max_new_tokens=4, batch_size=2, max_memory_gb=100), 4).batch_size == 2
    with pytest.raises(RequestError, match="batch 1"):
        fit_batch(captioner, CaptionOptions(max_new_tokens=4, max_memory_gb=need[0] / 2e9), images=4)
    with pytest.raises(RequestError, match="batch 4"):
        fit_batch(captioner, CaptionOptions(max_new_tokens=4, batch_size=4, max_memory_gb=need[1] / 1e9), images=4)


def test_options_build_a_greedy_or_seeded_sampler():
    import numpy as np

    logits = np.log(np.array([[0.1, 0.6, 0.3]] * 200, dtype=np.float32))
    assert CaptionOptions().sampler()(logits).tolist() == [1] * 200
    draw = [CaptionOptions(temperature=1.0, seed=7).sampler()(logits).tolist() for _ in range(2)]
    assert draw[0] == draw[1] and len(set(draw[0])) == 3
    assert len(CaptionOptions(repetition_penalty=1.3, no_repeat_ngram_size=2).logits_processors()) == 2
    with pytest.raises(AttributeError):
        CaptionOptions().prompt = "x"  # frozen: one job's settings do not change under it


# --- existing captions and several captions per image --------------------------------------------------------

def test_append_and_prepend_runs_add_each_new_caption_once(tmp_path, captioner):
    root = _images(tmp_path / "d", ["a.png", "b.png", "c.png"])
    (root / "a.txt").write_text("sks, old a\n")
    (root / "b.txt").write_text("old b")
    fresh = CaptionOptions(max_new_tokens=5, output_dir=tmp_path / "fresh")
    caption_files(captioner, plan_run(find_images([str(root)]), fresh), fresh, quiet=True)
    new = {name: (tmp_path / "fresh" / f"{name}.txt").read_text() for name in "abc"}
    jsonl = tmp_path / "r.jsonl"
    options = CaptionOptions(max_new_tokens=5, existing="append", jsonl=jsonl)
    summary = caption_files(captioner, plan_run(find_images([str(root)]), options), options, quiet=True)
    assert summary.captioned == 3
    assert captions(root) == {"a.txt": f"sks, old a, {new['a']}", "b.txt": f"old b, {new['b']}", "c.txt": new["c"]}
    rows = {Path(r["path"]).name: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert rows["a.png"]["caption"] == f"sks, old a, {new['a']}" and rows["a.png"]["captions"] == [new["a"]]
    assert not list(root.glob(f".*{CLAIM_SUFFIX}"))  # the run finished: its marks are gone
    prepend = CaptionOptions(max_new_tokens=5, existing="prepend", separator=" / ")
    caption_files(captioner, plan_run(find_images([str(root)]), prepend), prepend, quiet=True)
    assert (root / "b.txt").read_text() == f"{new['b']} / old b, {new['b']}"  # a new run adds again


def test_an_interrupted_appends_marks_make_the_rerun_add_once(tmp_path, captioner):
    """What a killed append run leaves: a mark (claim text = the caption file) for a finished image, and a
    claim whose caption never reached the file. The re-run skips the first, appends to the second, and
    clears both."""
    root = _images(tmp_path / "d", ["a.png", "b.png"])
    jsonl = tmp_path / "r.jsonl"
    dead = ProcessId(socket.gethostname(), os.getpid(), 1.0)
    line = json.dumps({"path": str(root / "a.png"), "status": "captioned"})
    (root / "a.txt").write_text("old a, done")
    (root / "b.txt").write_text("old b")
    for name, text in (("a.txt", "old a, done"), ("b.txt", "old b, lost")):
        claim_path(root / name).write_text(json.dumps(
            {"owner": dead.to_json(), "jsonl": str(jsonl), "line": line if name == "a.txt" else None, "text": text}))
    options = CaptionOptions(max_new_tokens=5, existing="append", jsonl=jsonl)
    summary = caption_files(captioner, plan_run(find_images([str(root)]), options), options, quiet=True)
    assert (summary.captioned, summary.by_others) == (1, 1)
    assert (root / "a.txt").read_text() == "old a, done"
    assert (root / "b.txt").read_text().startswith("old b, ") and "lost" not in (root / "b.txt").read_text()
    assert jsonl.read_text().splitlines()[0] == line  # the dead run's record, recovered once
    assert len(jsonl.read_text().splitlines()) == 2
    assert not list(root.glob(f".*{CLAIM_SUFFIX}"))


def test_several_captions_per_image_are_lines_of_one_file_and_all_recorded(tmp_path, captioner):
    root = _images(tmp_path / "d", ["a.png", "b.png"])
    (root / "bad.png").write_bytes(b"not an image")
    jsonl = tmp_path / "r.jsonl"
    options = CaptionOptions(max_new_tokens=6, temperature=1.5, seed=0, captions_per_image=3, batch_size=4,
                             jsonl=jsonl)
    summary = caption_files(captioner, plan_run(find_images([str(root)]), options), options, quiet=True)
    assert (summary.captioned, summary.failed) == (2, 1)
    rows = {Path(r["path"]).name: r for r in map(json.loads, jsonl.read_text().splitlines())}
    for name in ("a", "b"):
        lines = (root / f"{name}.txt").read_text().split("\n")
        assert len(lines) == 3 and rows[f"{name}.png"]["captions"] == lines
        assert len(set(lines)) > 1  # sampled: the captions differ
    assert rows["bad.png"]["status"] == "failed" and not (root / "bad.txt").exists()

"""Claim files: several `palionnx caption` runs on one folder share the work, each image done once.

Before captioning an image a run creates `.NAME.txt.palionnx-claim` beside its caption file with O_EXCL
(atomic on local disks, NFS v3+, SMB and on Windows). The claim names its owner (host, pid, start
time) and, once the caption is ready, holds the run's --jsonl path and the record line it will append:

    claim (O_EXCL) -> caption computed -> record line stored in the claim -> caption file renamed into
    place -> record appended to --jsonl -> claim removed

A claim whose owner is dead (same host: the process is gone; another host: older than CLAIM_LEASE_S) is
stale. Whoever finds a stale claim finishes the dead run's work: when the caption is there, it appends
the stored record to that run's --jsonl if it is missing; then it removes the dead run's temp file of that
caption (killed mid-write) and the claim and, if there was no caption, captions the image itself. So after
any sequence of kills and re-runs every caption has exactly one --jsonl record.

With `--existing append` / `prepend` a caption file exists before and after, so its presence cannot say
whether an image is done. There the claim also stores the caption file's new text, and a claim whose text
the caption file holds is a *mark*: that image is done. A run keeps its marks until it has finished every
image (Ctrl-C or a kill leaves them), then removes them and the marks of dead runs it found; so re-running
an interrupted append adds to each image once, and runs sharing the folder add once between them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..system import ProcessId, is_alive, side_file
from .files import append_line, temp_files, write_atomic

CLAIM_SUFFIX = ".palionnx-claim"
CLAIM_LEASE_S = 3600.0  # a claim from another host is taken over after this long
_UNWRITTEN_S = 10.0  # an empty claim (owner killed between create and write) is stale after this long
_BREAK_LOCK_S = 60.0  # a lock of someone breaking a stale claim, left by a crash, after this long
_BREAK = ".break"  # that lock's suffix, after the claim's name


def claim_path(target: Path) -> Path:
    """The claim file of a caption file (a shortened name where the caption's is long: `system.side_file`;
    room is kept for the ".break" lock beside it)."""
    return side_file(target, CLAIM_SUFFIX, reserve=len(_BREAK))


@dataclass
class ClaimInfo:
    """What a claim file holds."""

    owner: ProcessId | None
    jsonl: str | None = None
    line: str | None = None  # the --jsonl record, stored just before the caption is published
    text: str | None = None  # with marks (--existing append / prepend): the caption file's new text


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim's content; None when there is no claim. An unreadable claim has owner None."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return ClaimInfo(None)
    try:
        data = json.loads(text)
        return ClaimInfo(ProcessId.from_json(data["owner"]), data.get("jsonl"), data.get("line"), data.get("text"))
    except (ValueError, KeyError, TypeError):
        return ClaimInfo(None)


def is_mark(info: ClaimInfo, target: Path) -> bool:
    """Whether the claim marks `target` as done: the caption file holds the text stored in the claim."""
    return info.text is not None and _holds(target, info.text)


def _holds(target: Path, text: str) -> bool:
    """Whether the file holds exactly `text` (bytes compared: reading text would turn a caption's "\r" into
    "\n")."""
    try:
        return target.read_bytes() == text.encode("utf-8")
    except OSError:
        return False


def is_stale(path: Path, info: ClaimInfo) -> bool:
    """Whether the claim's owner is gone (see the module docstring)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: not stale, simply gone
    if info.owner is None:
        return age > _UNWRITTEN_S
    alive = is_alive(info.owner)
    return age > CLAIM_LEASE_S if alive is None else not alive


class Claims:
    """This run's claims. `claim(target)` -> True when this run may caption `target`. With `marks`, a published
    caption's claim stays as its mark until `clear_marks` (see the module docstring)."""

    def __init__(self, jsonl: Path | None, marks: bool = False):
        self.me = ProcessId.current()
        self.jsonl = str(jsonl.resolve()) if jsonl else None
        self.marks = marks
        self.held: set[Path] = set()
        self.lines: dict[Path, str] = {}  # records stored in held claims
        self.texts: dict[Path, str] = {}  # with marks: the caption texts stored in held claims
        self.marked: set[Path] = set()  # marks to remove when the run has done every image
        self.creating: Path | None = None  # a claim being created: a Ctrl-C there leaves a file `held` lacks

    def claim(self, target: Path) -> bool:
        """Take the claim of `target`; a stale claim is finished and taken over. False if someone holds it;
        OSError when the folder cannot take a claim file (read-only, full)."""
        path = claim_path(target)
        path.parent.mkdir(parents=True, exist_ok=True)  # --output-dir mirrors folders that may not exist yet
        for _ in range(2):
            self.creating = target
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.creating = None
                if not recover_stale(path, target, self.marks):
                    return False
                continue
            with os.fdopen(handle, "w", encoding="utf-8") as claim:
                claim.write(json.dumps(self._content()))
            self.held.add(target)
            self.creating = None
            return True
        return False

    def store_record(self, target: Path, line: str, text: str | None = None) -> None:
        """Keep the --jsonl record (and, with marks, the caption file's new `text`) in the claim, so a kill
        after the caption is published loses nothing."""
        if target in self.held:
            text = text if self.marks else None
            write_atomic(claim_path(target), json.dumps(self._content(line, text)))
            self.lines[target] = line
            if text is not None:
                self.texts[target] = text

    def done_by_mark(self, target: Path) -> bool:
        """With marks: whether a claim on `target` marks it done (a dead run's mark is removed with ours)."""
        path = claim_path(target)
        info = read_claim(path) if self.marks else None
        if info is None or info.owner is None or not is_mark(info, target):
            return False
        if info.owner != self.me and is_stale(path, info):
            self.marked.add(target)
        return True

    def release(self, target: Path) -> None:
        """Remove the claim of `target` (its record, if any, is in --jsonl by now); with marks, the claim of
        a published caption stays as its mark."""
        if target in self.held:  # forgotten only once its file is dealt with, so a Ctrl-C here loses nothing
            text = self.texts.get(target)
            if text is not None and _holds(target, text):
                self.marked.add(target)
            else:
                claim_path(target).unlink(missing_ok=True)
            self.held.discard(target)
            self.lines.pop(target, None)
            self.texts.pop(target, None)

    def clear_marks(self) -> None:
        """The run has done every image: remove its marks and those of dead runs it found."""
        for target in self.marked:
            claim_path(target).unlink(missing_ok=True)
        self.marked.clear()

    def release_all(self) -> None:
        """End of run or interrupted: a caption already published keeps its --jsonl record."""
        if self.creating is not None:  # interrupted while creating a claim: remove it if it is ours
            path = claim_path(self.creating)
            info = read_claim(path)
            if info is not None and info.owner in (None, self.me):  # None: created, not yet written
                path.unlink(missing_ok=True)
            self.creating = None
        for target in list(self.held):
            line, text = self.lines.get(target), self.texts.get(target)
            published = target.is_file() if text is None else _holds(target, text)
            if line and self.jsonl and published:
                append_missing_record(Path(self.jsonl), line)
            self.release(target)

    def _content(self, line: str | None = None, text: str | None = None) -> dict[str, Any]:
        return {"owner": self.me.to_json(), "jsonl": self.jsonl, "line": line, "text": text}


def recover_stale(path: Path, target: Path, keep_marks: bool = False) -> bool:
    """If the claim at `path` is stale, finish its dead run's record and remove it; True when removed.
    With `keep_marks`, a stale claim that marks its caption done stays (False; its record finished).

    Removal happens under a lock file, so two runs finding the same stale claim never both take it.
    """
    info = read_claim(path)
    if info is None:
        return True  # released meanwhile
    if not is_stale(path, info):
        return False
    lock = path.with_name(path.name + _BREAK)
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        _drop_abandoned_lock(lock)
        return False
    try:
        info = read_claim(path)  # read again under the lock: it may have been taken over meanwhile
        if info is None or not is_stale(path, info):
            return info is None
        if info.line and info.jsonl and target.is_file() and (info.text is None or is_mark(info, target)):
            append_missing_record(Path(info.jsonl), info.line)
        if keep_marks and is_mark(info, target):
            return False
        # a caption and its claim only the claim's holder writes (the claim again in `store_record`): a temp
        # file of either is the dead owner's, half-written
        for temp in temp_files(target) + temp_files(path):
            temp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(handle)
        lock.unlink(missing_ok=True)


def _drop_abandoned_lock(lock: Path) -> None:
    try:
        if time.time() - lock.stat().st_mtime > _BREAK_LOCK_S:
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def append_missing_record(jsonl: Path, line: str) -> None:
    """Append `line` to `jsonl` unless it is there already (the dead run may have appended it)."""
    try:
        with open(jsonl, encoding="utf-8") as existing:
            if any(row.rstrip("\n") == line for row in existing):
                return
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError):
        return  # unreadable: leave it as it is rather than guess
    try:
        with open(jsonl, "a", encoding="utf-8") as out:
            append_line(out, line)
    except OSError:
        return

"""Finding images, naming caption files and writing them atomically (clean-up of raw captions: cleanup.py)."""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..runtime.preprocess import IMAGE_EXTENSIONS
from ..system import fsync_folder, link_exclusive, pid_alive, side_file

TEMP_SUFFIX = ".palionnx-tmp"


@dataclass(frozen=True)
class ImageJob:
    """An image to caption and the folder its path is relative to (for --output-dir mirroring)."""

    image: Path
    root: Path


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: list[str], recursive: bool = True) -> list[ImageJob]:
    """Expand files, folders and glob patterns into image jobs, in a stable sorted order.

    Every path is a job of its own, symbolic links included (two paths to one file give two caption
    files); the same path reached twice (a folder and a file in it) counts once. A link whose target is
    missing is a job too: it fails as unreadable rather than vanish. Raises FileNotFoundError naming an
    input that matches nothing: a missing path and a glob without matches alike.
    """
    jobs: dict[str, ImageJob] = {}
    for text in inputs:
        for candidate, root in _candidates(text, recursive):
            key = os.path.normpath(os.path.abspath(candidate))
            if key not in jobs and is_image(candidate) and (candidate.is_file() or candidate.is_symlink()):
                jobs[key] = ImageJob(candidate, root)
    return sorted(jobs.values(), key=lambda job: str(job.image))


def _candidates(text: str, recursive: bool) -> list[tuple[Path, Path]]:
    """(path, root) pairs for one input: a folder's files, a file, or a glob's matches."""
    path = Path(text).expanduser()
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        return [(p, path) for p in found]
    if path.is_file() or path.is_symlink():
        return [(path, path.parent)]
    if glob.has_magic(text):
        root = Path(re.split(r"[*?\[]", os.path.expanduser(text), maxsplit=1)[0] or ".")
        root = root if root.is_dir() else root.parent
        matches = glob.glob(os.path.expanduser(text), recursive=recursive)
        if matches:
            return [(Path(p), root) for p in matches]
        raise FileNotFoundError(f"{text}: the pattern matches no file")
    raise FileNotFoundError(f"{text}: no such file, folder or matching pattern")


def caption_path(job: ImageJob, ext: str, output_dir: Path | None) -> Path:
    """`photo.jpg` -> `photo.txt` beside it, or at the same relative place under `output_dir`."""
    name = job.image.with_suffix(ext).name
    if output_dir is None:
        return job.image.with_name(name)
    relative = job.image.parent.resolve().relative_to(job.root.resolve())
    return output_dir / relative / name


_PID_ROOM = 11  # "." and up to 10 digits of a process id


def temp_file(path: Path, pid: int) -> Path:
    """Where `write_atomic` in process `pid` writes `path` before the rename (`.NAME.PID.palionnx-tmp`, the
    name shortened where it would be too long: `system.side_file`)."""
    stem = side_file(path, "", reserve=_PID_ROOM + len(TEMP_SUFFIX))
    return stem.with_name(f"{stem.name}.{pid}{TEMP_SUFFIX}")


def temp_files(path: Path) -> list[Path]:
    """The temp files of `path` there now, any process's (a killed writer's are half-written)."""
    stem = side_file(path, "", reserve=_PID_ROOM + len(TEMP_SUFFIX))
    return sorted(path.parent.glob(f"{glob.escape(stem.name)}.*{TEMP_SUFFIX}"))


def write_atomic(path: Path, text: str, exclusive: bool = False) -> None:
    """Write via a temp file and a rename: a reader (or a crash) never sees half a caption.

    With `exclusive` the temp file is put in place only if `path` does not exist (FileExistsError
    otherwise), so a caption that another process wrote in the meantime is never replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_file(path, os.getpid())
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            link_exclusive(temp, path)
        else:
            os.replace(temp, path)
        fsync_folder(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def append_line(handle: IO[str], line: str) -> None:
    """Append one line to a file opened for appending, in a single write, and flush it. A partial last line
    (a writer killed mid-line) is ended first, so the new line stays whole."""
    handle.flush()
    prefix = ""
    size = os.fstat(handle.fileno()).st_size
    if size:
        with open(handle.name, "rb") as raw:
            raw.seek(size - 1)
            prefix = "" if raw.read(1) == b"\n" else "\n"
    handle.write(prefix + line + "\n")
    handle.flush()


_STALE_TEMP_S = 600.0  # a temp file lives for one write and rename: one this old is abandoned anywhere


def remove_stale_temp_files(folders: set[Path]) -> int:
    """Delete temp files that killed runs left behind: those of processes gone from this machine, and any
    older than ten minutes (a run on another machine sharing the folder). A live run's are kept."""
    removed = 0
    now = time.time()
    for folder in folders:
        if not folder.is_dir():
            continue
        for temp in folder.glob(f".*{TEMP_SUFFIX}"):
            pid = temp.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
            try:
                old = now - temp.stat().st_mtime > _STALE_TEMP_S
            except FileNotFoundError:
                continue
            if old or (pid.isdigit() and pid_alive(int(pid)) is False):
                temp.unlink(missing_ok=True)
                removed += 1
    return removed

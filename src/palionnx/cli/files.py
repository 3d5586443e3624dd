"""Finding images, naming caption files, writing them atomically, and cleaning raw captions."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEMP_SUFFIX = ".palionnx-tmp"


@dataclass(frozen=True)
class ImageJob:
    """An image to caption and the folder its path is relative to (for --output-dir mirroring)."""

    image: Path
    root: Path


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: list[str], recursive: bool = True) -> list[ImageJob]:
    """Expand files, folders and glob patterns into image jobs, in a stable sorted order, without duplicates.

    Raises FileNotFoundError naming an input that matches nothing.
    """
    jobs: dict[Path, ImageJob] = {}
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            candidates = [(p, path) for p in found]
        elif path.is_file():
            candidates = [(path, path.parent)]
        elif glob.has_magic(text):
            root = Path(re.split(r"[*?\[]", text, maxsplit=1)[0] or ".")
            root = root if root.is_dir() else root.parent
            candidates = [(Path(p), root) for p in glob.glob(os.path.expanduser(text), recursive=recursive)]
        else:
            raise FileNotFoundError(f"{text}: no such file, folder or matching pattern")
        for candidate, root in candidates:
            if candidate.is_file() and is_image(candidate) and candidate.resolve() not in jobs:
                jobs[candidate.resolve()] = ImageJob(candidate, root)
    return sorted(jobs.values(), key=lambda job: str(job.image))


def caption_path(job: ImageJob, ext: str, output_dir: Path | None) -> Path:
    """`photo.jpg` -> `photo.txt` beside it, or at the same relative place under `output_dir`."""
    name = job.image.with_suffix(ext).name
    if output_dir is None:
        return job.image.with_name(name)
    relative = job.image.parent.resolve().relative_to(job.root.resolve())
    return output_dir / relative / name


def write_atomic(path: Path, text: str, exclusive: bool = False) -> None:
    """Write via a temp file and a rename: a reader (or a crash) never sees half a caption.

    With `exclusive` the temp file is hard-linked into place instead, which raises FileExistsError
    rather than replace a caption that another process wrote in the meantime.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temp, path)
        else:
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_temp_files(folders: set[Path]) -> int:
    """Delete temp files a killed run left behind (normally none: the window is one rename)."""
    removed = 0
    for folder in folders:
        if folder.is_dir():
            for stale in folder.glob(f".*{TEMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
                removed += 1
    return removed


_BRACKETED = re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}")


def clean_caption(text: str) -> str:
    """The origin script's post-processing of raw captions, in this order:

    1. drop bracketed text: `(...)`, `[...]`, `{...}`;
    2. cut back to the last `.` or `,` so a caption stopped by the token limit ends on a whole clause
       (a final `.` is kept, a final `,` is dropped); text with neither is kept whole;
    3. collapse runs of whitespace to one space and strip the ends.
    """
    previous = None
    while previous != text:  # nested brackets: remove innermost first
        previous, text = text, _BRACKETED.sub("", text)
    cut = max(text.rfind("."), text.rfind(","))
    if cut >= 0:
        text = text[: cut + 1] if text[cut] == "." else text[:cut]
    return re.sub(r"\s+", " ", text).strip()

"""Size and SHA-256 of every file of a model folder: recorded in the manifest at export, checked on load.

Loading compares sizes only (a stat per file: catches truncated copies and downloads, and missing weight
files, before onnxruntime sees them); `palionnx info --verify` compares the hashes too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 8 << 20


@dataclass
class FileInfo:
    """One file of the folder as export wrote it."""

    size: int  # bytes
    sha256: str  # hex digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(folder: Path, skip: tuple[str, ...]) -> dict[str, FileInfo]:
    """Size and hash of every file directly in `folder`, except the names in `skip` (the manifest)."""
    return {path.name: FileInfo(path.stat().st_size, sha256_of(path))
            for path in sorted(folder.iterdir()) if path.is_file() and path.name not in skip}


def size_problems(folder: Path, files: dict[str, FileInfo]) -> list[str]:
    """What is missing or has the wrong size, one sentence per file (empty when all is well)."""
    problems = []
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != info.size:
            problems.append(f"{name} has {size} bytes, {info.size} expected (truncated or replaced)")
    return problems


def hash_problems(folder: Path, files: dict[str, FileInfo],
                  progress: Callable[[str], None] | None = None) -> list[str]:
    """Files whose SHA-256 differs from the recorded one (after `size_problems`, which they include)."""
    problems = size_problems(folder, files)
    damaged = {problem.split(" ", 1)[0] for problem in problems}
    for name, info in files.items():
        if name in damaged:
            continue
        if progress:
            progress(f"hashing {name} ({info.size / 1e6:.1f} MB)")
        if sha256_of(folder / name) != info.sha256:
            problems.append(f"{name} has the right size but different contents (SHA-256 mismatch)")
    return problems

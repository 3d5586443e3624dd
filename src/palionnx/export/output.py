"""Where an export writes: a staging folder beside the output, renamed into place only when complete.

A failed or interrupted export leaves nothing at `-o` (and a model folder that was there stays intact
until the new one is complete); a file or a foreign folder at `-o` is refused before any work.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..runtime.contract import MANIFEST_NAME
from ..system import pid_alive

_STAGING = ".partial-"
_REPLACED = ".replaced-"


class OutputError(Exception):
    """The output path cannot take a model folder; the message says why."""


def check_output(final: Path) -> None:
    """Refuse, before any work, an output that is a file or a non-empty folder that is not a model folder."""
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final} exists and is not a folder: give -o a folder path (it is created)")
    if final.is_dir() and any(final.iterdir()) and not (final / MANIFEST_NAME).is_file():
        raise OutputError(f"{final} is a folder with other files in it, not a palionnx model folder: "
                          "choose a new or empty folder for -o")
    parent = _existing_parent(final)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot create {final}: {parent} is not writable")


@contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; when the block ends normally it becomes `final`
    (replacing a model folder there), otherwise it is removed with any parent folders it created."""
    check_output(final)
    created = _missing_parents(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    staging = final.with_name(f".{final.name}{_STAGING}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _follow_umask(staging)
        _replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _replace(staging: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staging, final)
        return
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
        os.rename(staging, final)
        return
    old = final.with_name(f".{final.name}{_REPLACED}{os.getpid()}")
    os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """Give every file the mode the user's umask asks for (some writers create theirs 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _remove_abandoned(final: Path) -> None:
    """Staging folders of exports to `final` whose process is gone (killed, power cut)."""
    for prefix in (_STAGING, _REPLACED):
        for folder in final.parent.glob(f".{final.name}{prefix}*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)) is False:
                shutil.rmtree(folder, ignore_errors=True)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _missing_parents(path: Path) -> list[Path]:
    """The parent folders of `path` that do not exist yet, deepest first."""
    missing = []
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing

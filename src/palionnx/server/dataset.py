"""`palionnx serve MODEL --folder DIR`: a dataset's images and caption files for the review page.

Only DIR's image files (no symbolic link out of DIR) and their caption files, named as `palionnx caption`
names them (`--ext`, `--output-dir`), can be read or written: a path from a request is looked up among the
images found in DIR, never opened as it is. A caption is saved through a claim (`jobs/claims.py`) and an
atomic write, so a `palionnx caption` run on the same folder and the page never write one file at once and
nobody sees half a caption. Recaptioning runs on the server's engine, a few images in flight at a time.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..jobs.claims import Claims
from ..jobs.files import ImageJob, caption_path, find_images, write_atomic
from ..runtime.captioner import Captioner
from ..runtime.preprocess import ImageLoadError
from ..runtime.request import Completion, Request
from .engine import Engine
from .options import ServeError

CAPTION_EXTENSIONS = (".txt", ".caption")  # as `palionnx caption --ext` takes them


class DatasetError(Exception):
    """A request the dataset refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Progress:
    """The recaptioning in hand: how many images, how many done and failed, and each failure's reason."""

    total: int = 0
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # image path -> why
    queued: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "done": self.done, "failed": len(self.failed),
                "running": bool(self.queued)}


class Dataset:
    """The images of `root` and their caption files (`ext`, beside them or under `output_dir`)."""

    def __init__(self, root: Path, ext: str = ".txt", output_dir: Path | None = None):
        """ServeError (the server cannot start) for a folder that is not one, or an unknown extension."""
        if not root.is_dir():
            raise ServeError(f"--folder {root}: no such folder")
        if ext not in CAPTION_EXTENSIONS:
            raise ServeError(f"--ext must be {' or '.join(CAPTION_EXTENSIONS)}, got {ext!r}")
        self.root, self.ext, self.output_dir = root.resolve(), ext, output_dir.resolve() if output_dir else None
        self.progress = Progress()
        self.lock = threading.Lock()
        self._found: dict[str, ImageJob] = {}  # the images last found, by relative path

    def images(self) -> dict[str, ImageJob]:
        """DIR's images by their path relative to DIR, links that lead out of DIR left out (found afresh, and
        kept for `job`)."""
        self._found = {job.image.relative_to(self.root).as_posix(): job for job in find_images([str(self.root)])
                       if self._inside(job)}
        return self._found

    def job(self, relative: str) -> ImageJob:
        """The image at `relative` (as `images()` names it); 404 for anything else. Looked up among the images
        last found (the folder is searched again only for a path not among them, or one gone since)."""
        job = self._found.get(relative)
        if job is None or not (job.image.is_file() or job.image.is_symlink()) or not self._inside(job):
            job = self.images().get(relative)
        if job is None:
            raise DatasetError(404, f"{relative!r} is not an image of the folder")
        return job

    def _inside(self, job: ImageJob) -> bool:
        """Whether the image, links followed, is inside DIR."""
        try:
            return job.image.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def caption_file(self, job: ImageJob) -> Path:
        return caption_path(job, self.ext, self.output_dir)

    def writable(self) -> bool:
        return os.access(self.output_dir or self.root, os.W_OK)

    def listing(self) -> dict[str, Any]:
        """Every image with its caption (None when missing) and status: captioned, missing, failed or queued."""
        items = []
        for relative, job in self.images().items():
            target = self.caption_file(job)
            caption = target.read_text(encoding="utf-8", errors="replace") if target.is_file() else None
            status = "queued" if relative in self.progress.queued else "failed" if relative in self.progress.failed \
                else "captioned" if caption is not None else "missing"
            items.append({"path": relative, "caption": caption, "status": status,
                          "error": self.progress.failed.get(relative)})
        return {"folder": str(self.root), "ext": self.ext, "writable": self.writable(), "items": items,
                "progress": self.progress.to_json()}

    def save(self, relative: str, text: str) -> None:
        """Write the caption of `relative` atomically, under a claim; 409 while a caption run holds it."""
        target = self.caption_file(self.job(relative))
        if not self.writable():
            raise DatasetError(403, f"{self.output_dir or self.root} is read-only: captions cannot be saved")
        claims = Claims(None)
        try:
            if not claims.claim(target):
                raise DatasetError(409, f"{relative} is being captioned by a palionnx caption run: save it later")
            write_atomic(target, text)
        except OSError as exc:
            raise DatasetError(403, f"cannot save {target.name} ({exc.strerror or exc})") from None
        finally:
            claims.release_all()

    def recaption(self, paths: list[str], captioner: Captioner, engine: Engine, settings: dict[str, Any]) -> None:
        """Caption `paths` again (in the background) with `settings` (`app.settings`), saving each as it ends."""
        jobs = {relative: self.job(relative) for relative in paths}
        if not self.writable():
            raise DatasetError(403, f"{self.output_dir or self.root} is read-only: captions cannot be saved")
        with self.lock:
            if self.progress.queued:
                raise DatasetError(409, "a recaptioning is already running: wait for it to end")
            self.progress = Progress(total=len(jobs), queued=set(jobs))
        thread = threading.Thread(target=self._recaption, args=(jobs, captioner, engine, settings), daemon=True)
        thread.start()

    def _recaption(self, jobs: dict[str, ImageJob], captioner: Captioner, engine: Engine,
                   settings: dict[str, Any]) -> None:
        window = max(engine.scheduler.slots, 1)
        pending = list(jobs.items())
        in_flight: list[tuple[str, Future[Completion]]] = []
        while pending or in_flight:
            while pending and len(in_flight) < window:
                relative, job = pending.pop(0)
                pixels = captioner.load_pixels(job.image)
                if isinstance(pixels, ImageLoadError):
                    self._finish(relative, error=str(pixels))
                    continue
                try:
                    in_flight.append((relative, engine.submit(Request(pixels, **settings))))
                except Exception as exc:  # noqa: BLE001 - the queue is full or the server stops: said per image
                    self._finish(relative, error=str(exc))
            if in_flight:
                relative, future = in_flight.pop(0)
                try:
                    self.save(relative, future.result().text)
                    self._finish(relative)
                except Exception as exc:  # noqa: BLE001 - a failed caption or save is that image's status
                    self._finish(relative, error=str(exc))

    def _finish(self, relative: str, error: str | None = None) -> None:
        with self.lock:
            self.progress.queued.discard(relative)
            self.progress.done += 1
            if error is not None:
                self.progress.failed[relative] = error

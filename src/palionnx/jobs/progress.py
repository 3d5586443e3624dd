"""What the CLI prints on stderr while it works: rich bars on a terminal, plain lines otherwise.

- `Progress`: counted work (images). Terminal: a bar with done / total, images per second and ETA, errors
  printed above it. Not a terminal (a log, a pipe): one line per item. Quiet: errors only.
- `Steps`: a sequence of steps (export). Terminal: a spinner with the current step and its time. Otherwise
  one line per step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress


def stderr_console(stream: IO[str] | None = None) -> Console:
    """A rich console on stderr that never interprets [brackets] in file names as markup."""
    return Console(file=stream or sys.stderr, highlight=False, markup=False, soft_wrap=True)


def print_line(message: str, stream: IO[str] | None = None) -> None:
    """One message on stderr, on a line of its own."""
    stream = stream or sys.stderr
    stream.write(message + "\n")
    stream.flush()


class Progress:
    """Images done out of `total`; see the module docstring for what each mode shows."""

    def __init__(self, total: int, quiet: bool = False, stream: IO[str] | None = None):
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stderr
        self.console = stderr_console(self.stream)
        self.tty = self.console.is_terminal
        self.done = 0
        self.start = time.perf_counter()
        self.bar: RichProgress | None = None
        if self.tty and not quiet:
            self.bar = RichProgress(
                TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.bar.add_task("captioning", total=total, rate="")
            self.bar.start()

    def update(self, path: Path | str, status: str, error: str | None = None) -> None:
        """Count one image; an error is always shown, on a line of its own that names the image."""
        self.done += 1
        if error and (self.tty or self.quiet):
            self.error(f"error: {error}")
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed else 0.0
        if self.bar is not None:
            self.bar.update(self.task, advance=1, rate=f"{rate:.2f} img/s")
        else:
            line = f"error: {error}" if error else f"{path}: {status}"
            self._line(f"[{self.done}/{self.total}] {line}")

    def error(self, message: str) -> None:
        """A message shown even when quiet."""
        self._line(message)

    def note(self, message: str) -> None:
        """A message shown unless quiet."""
        if not self.quiet:
            self._line(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def _line(self, text: str) -> None:
        if self.tty:
            self.console.print(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


class Steps:
    """Progress of a job made of named steps (`say(message)` starts the next one); nothing when quiet."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.console = stderr_console(self.stream)
        self.quiet = quiet
        self.spinner: RichProgress | None = None
        if self.console.is_terminal and not quiet:
            self.spinner = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                        console=self.console, transient=True)
            self.task = self.spinner.add_task("", total=None)
            self.spinner.start()

    def say(self, message: str) -> None:
        if self.quiet:
            return
        if self.spinner is None:
            self.stream.write(message + "\n")
            self.stream.flush()
            return
        self.console.print(message)
        self.spinner.reset(self.task, description=message.split("] ", 1)[-1])

    def close(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

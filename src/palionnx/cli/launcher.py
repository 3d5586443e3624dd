"""The `palionnx` console script. It imports nothing heavy itself, so that Ctrl-C at any moment (even while
onnxruntime is still importing) and a missing onnxruntime end in one line, never a traceback.

Exit status: what the command says; 2 for usage errors (one line, with the command's --help to read);
130 when interrupted (Ctrl-C, SIGTERM, Ctrl-Break on Windows).
"""

from __future__ import annotations

import contextlib
import sys
from typing import NoReturn

from .. import _interrupted
from ..system import on_termination


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the command line `argv` (default: sys.argv[1:]) and exit with its status."""
    try:
        _install_one_line_warnings()
        on_termination(_interrupt)  # `kill` and service stops end a run like Ctrl-C: cleanly, resumable
        from .app import app
    except KeyboardInterrupt:
        _exit("interrupted", 130)
    except ImportError as exc:
        if _interrupted(exc):
            _exit("interrupted", 130)
        if exc.name != "onnxruntime":
            raise
        _exit(f"error: {exc}", 2)
    _exit_with(_run(app, sys.argv[1:] if argv is None else argv))


def _run(app: object, args: list[str]) -> int:
    import typer

    try:
        result = app(args=clean_styles(args), prog_name="palionnx", standalone_mode=False)  # type: ignore[operator]
    except (typer.Abort, KeyboardInterrupt):  # typer turns Ctrl-C into exit 130 itself; EOF on stdin is Abort
        sys.stderr.write("interrupted\n")
        return 130
    except _usage_errors() as exc:  # a usage error (bad option, missing argument) found by typer
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sys.stderr.write(f"error: {message}{hint}\n")
        return int(getattr(exc, "exit_code", 2))
    if result == 130:
        sys.stderr.write("interrupted\n")
    return result if isinstance(result, int) else 0


def clean_styles(args: list[str]) -> list[str]:
    """`--clean STYLE` and `--clean=STYLE` spelled as `--clean --clean-style STYLE`. typer has no option whose
    value may be left out without taking the next argument (a folder) for it, so only a style's own name
    after `--clean` is read as its value."""
    from ..jobs.cleanup import STYLES

    spelled: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            spelled += [arg, *rest]
        elif arg.startswith("--clean="):
            spelled += ["--clean", "--clean-style", arg.removeprefix("--clean=")]
        elif arg == "--clean" and (following := next(rest, None)) is not None:
            spelled += ["--clean", "--clean-style", following] if following in STYLES else [arg, following]
        else:
            spelled.append(arg)
    return spelled


def _usage_errors() -> tuple[type[Exception], ...]:
    """typer >= 0.29 raises its own (vendored click) exceptions; older typers raise click's."""
    import typer

    kinds: list[type[Exception]] = [getattr(typer, "TyperException", typer.BadParameter)]
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _interrupt() -> NoReturn:
    raise KeyboardInterrupt


def _install_one_line_warnings() -> None:
    """Library warnings print as "warning: message" on one line, not two lines with source code."""
    import warnings

    def show(message: Warning | str, category: type[Warning], *_args: object, **_kwargs: object) -> None:
        sys.stderr.write(f"warning: {message}\n")

    warnings.showwarning = show


def _exit(message: str, status: int) -> NoReturn:
    sys.stderr.write(message + "\n")
    _exit_with(status)


def _exit_with(status: int) -> NoReturn:
    with contextlib.suppress(BrokenPipeError, ValueError):  # `palionnx info | head`: the reader left
        sys.stdout.flush()
    sys.exit(status)

"""Entry point of the `palionnx` command, kept outside the palionnx package on purpose.

Importing palionnx itself can fail (no onnxruntime installed) or be interrupted (Ctrl-C while
onnxruntime loads); run from here, either ends in one line on stderr (exit 2 or 130), never a traceback.
Everything else happens in `palionnx.cli.launcher`.
"""

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _ctrl_c_after_imports() -> Iterator[None]:
    """Hold Ctrl-C back while the heavy imports run, then deliver it. Extension modules that are
    interrupted while initialising print a traceback themselves (numpy under onnxruntime does); held
    back, the KeyboardInterrupt arrives after them, where it is caught. POSIX only; elsewhere a no-op."""
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:
        yield
        return
    block(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        block(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C pressed meanwhile is raised here


def main() -> None:
    try:
        with _ctrl_c_after_imports():
            from palionnx.cli.launcher import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except ImportError as exc:
        if exc.name != "onnxruntime":
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    run()

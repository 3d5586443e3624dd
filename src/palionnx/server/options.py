"""`ServeOptions`: the settings of `palionnx serve`, declared once (the CLI's options take their defaults here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..runtime.defaults import DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class ServeOptions:
    """`palionnx serve` settings (see its --help)."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: int | None = None  # None: DEFAULT_SERVE_CPU_SLOTS on the CPU, the device's default batch size elsewhere
    device: str = "auto"
    max_queue: int = 256  # requests waiting for a slot; more get 503
    timeout_s: float = 120.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the longest caption a request may ask for, and the default
    max_body_mb: float = 20.0
    cuda_graph: bool = True
    overlap: bool = True  # CPU: newcomers prefilled beside the decode steps (steady streams; ~20 % less throughput)
    api_keys: tuple[str, ...] = ()  # bearer keys every route but /healthz needs (none: open to whoever reaches it)
    metrics_public: bool = False  # /metrics without a key
    folder: Path | None = None  # serve the review page of this dataset at /
    ext: str = ".txt"  # the dataset's caption files, named as `palionnx caption` names them
    output_dir: Path | None = None


class ServeError(OSError):
    """The server cannot start (the address is in use, say); the message names what."""


class ServeExtraMissing(ImportError):
    """Starlette, uvicorn or prometheus_client is not installed."""


def require_serve_extra() -> None:
    """ServeExtraMissing, naming the install command, unless the serve extra's packages import."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeExtraMissing("`palionnx serve` needs the serve extra: pip install 'palionnx[serve]'") from None

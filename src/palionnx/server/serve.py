"""Start the server: load the model, start the engine, run uvicorn until SIGTERM / Ctrl-C (which drain)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..runtime.captioner import Captioner
from .app import Limits, create_app
from .engine import Engine
from .metrics import Metrics

MAX_PROMPT_TOKENS = 128  # text tokens a request's prompt may have (image tokens come on top)


class ServeExtraMissing(ImportError):
    """Starlette or uvicorn is not installed."""


@dataclass
class ServeOptions:
    """`palionnx serve` settings (see its --help)."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: int | None = None  # None: the device's default batch size
    device: str = "auto"
    max_queue: int = 256
    timeout_s: float = 120.0
    max_new_tokens: int = 256
    max_body_mb: float = 20.0
    cuda_graph: bool = True


def require_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeExtraMissing("`palionnx serve` needs the serve extra: pip install 'palionnx[serve]'") from None


def serve(folder: Path, options: ServeOptions, say: object = print) -> None:
    """Load `folder` and serve it until stopped (SIGTERM or Ctrl-C finish the requests in flight first)."""
    import uvicorn

    captioner = Captioner.load(folder, device=options.device, cuda_graph=options.cuda_graph)
    slots = options.slots or captioner.default_batch_size
    max_len = len(captioner.text.prompt_ids("")) + MAX_PROMPT_TOKENS + options.max_new_tokens
    engine = Engine(captioner, slots, max_len, options.max_queue, Metrics())
    engine.start()
    limits = Limits(options.max_new_tokens, options.timeout_s, int(options.max_body_mb * 2**20))
    app = create_app(captioner, engine, limits, model_name=folder.name)
    if callable(say):
        say(f"serving {folder} ({captioner.manifest.quant.level}, {captioner.device}, {slots} slots) on "
            f"http://{options.host}:{options.port}")
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning",
                timeout_graceful_shutdown=int(options.timeout_s) + 5)

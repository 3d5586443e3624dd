"""Start the server: load the model, start the engine, run uvicorn until SIGTERM / Ctrl-C (which drain)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime.captioner import Captioner
from ..runtime.defaults import DEFAULT_SERVE_CPU_SLOTS
from .app import Limits, create_app
from .dataset import Dataset
from .engine import Engine
from .metrics import Metrics
from .options import ServeError, ServeOptions

if TYPE_CHECKING:
    import uvicorn

MAX_PROMPT_TOKENS = 128  # text tokens a request's prompt may have (image tokens come on top)
# An idle keep-alive connection stays open this long: far beyond client pools' reuse of idle connections, so
# that a request sent on a connection is not met by the server closing it (uvicorn's 5 s dropped a few).
KEEP_ALIVE_S = 75
SHUTDOWN_GRACE_S = 5  # after SIGTERM: requests in flight get --timeout (they end by then) and this long more


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before anything else starts: ServeError naming the address when it is
    taken or not this machine's."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): is another server there? "
                         "Pick another --port") from None
    return sock


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (localhost, 127.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Service:
    """A model ready to serve: `server` answers on `sock` once run (`engine`, started, stops with it)."""

    server: uvicorn.Server
    sock: socket.socket
    engine: Engine
    banner: str  # "serving FOLDER (level, device, N slots) on http://HOST:PORT"


def prepare(folder: Path, options: ServeOptions) -> Service:
    """Bind the address, load `folder`, start the engine and build the uvicorn server over the app:
    everything `serve` does before it answers (ServeError when the address is taken)."""
    import uvicorn

    sock = listen(options.host, options.port)
    dataset = Dataset(options.folder, options.ext, options.output_dir) if options.folder else None
    captioner = Captioner.load(folder, device=options.device, cuda_graph=options.cuda_graph)
    slots = options.slots or (DEFAULT_SERVE_CPU_SLOTS if captioner.device == "cpu" else captioner.default_batch_size)
    max_len = len(captioner.text.prompt_ids("")) + MAX_PROMPT_TOKENS + options.max_new_tokens
    engine = Engine(captioner, slots, max_len, options.max_queue, Metrics(),
                    overlap=options.overlap and captioner.device == "cpu")
    engine.start()
    limits = Limits(options.max_new_tokens, options.timeout_s, int(options.max_body_mb * 2**20))
    app = create_app(captioner, engine, limits, model_name=folder.name, keys=options.api_keys,
                     metrics_public=options.metrics_public, dataset=dataset)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=int(options.timeout_s) + SHUTDOWN_GRACE_S)
    banner = (f"serving {folder} ({captioner.manifest.quant.level}, {captioner.device}, {slots} slots) on "
              f"http://{options.host}:{options.port}" + (f", reviewing {dataset.root}" if dataset else ""))
    return Service(uvicorn.Server(config), sock, engine, banner)


def serve(folder: Path, options: ServeOptions, say: Callable[[str], object] = print) -> None:
    """Load `folder` and serve it until stopped (SIGTERM or Ctrl-C finish the requests in flight first)."""
    service = prepare(folder, options)
    say(service.banner)
    if not options.api_keys and not is_loopback(options.host):
        say(f"warning: listening on {options.host} without --api-key: anyone who can reach the port can use it")
    service.server.run(sockets=[service.sock])

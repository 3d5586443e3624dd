"""What several test files share: the `palionnx` command in a subprocess, a dataset of awkward images, the
server in a subprocess or in this process (a thread), PNG bytes of sample images."""

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from palionnx.samples import sample_images

GOOD = ["a.png", "nested/b.JPG", "nested/deeper/c.PNG", "d.webp", "cmyk.jpg", "grey16.png", "palette.png",
        "anim.gif", "e.bmp", "f.tiff"]
BAD = ["corrupt.jpg", "empty.png", "text.jpg"]


def palionnx(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "palionnx", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def make_dataset(root: Path) -> Path:
    """Good images in nested folders with mixed-case extensions and awkward modes, and broken files."""
    pictures = iter(sample_images(10, size=40))
    for name in GOOD:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = next(pictures)
        if name == "cmyk.jpg":
            image = image.convert("CMYK")
        elif name == "grey16.png":
            image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        elif name == "palette.png":
            image = image.convert("P")
            image.info["transparency"] = 0
        if name == "anim.gif":
            image.save(path, save_all=True, append_images=[image.rotate(90)], duration=100)
        elif name == "palette.png":
            image.save(path, transparency=0)
        else:
            image.save(path)
    sample_images(1, size=200)[0].save(root / "corrupt.jpg", quality=95)
    (root / "corrupt.jpg").write_bytes((root / "corrupt.jpg").read_bytes()[:400])  # truncated JPEG
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a picture")
    (root / "notes.md").write_text("not an image extension: ignored")
    return root


def captions(root: Path, ext=".txt") -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob(f"*{ext}"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`palionnx serve MODEL` in a subprocess, ready when /healthz answers."""

    def __init__(self, model, *args, port=None, env=None):
        self.port = port or free_port()
        import httpx  # the serve tests skip themselves where it is missing

        self.process = subprocess.Popen(
            [sys.executable, "-m", "palionnx", "serve", str(model), "--port", str(self.port), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not start: " + self.process.stderr.read())

    def caption(self, png: bytes, **fields):
        return self.client.post("/v1/caption", files={"image": ("x.png", png, "image/png")},
                                data={k: str(v) for k, v in fields.items()})

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self.client.close()


class Served:
    """A client of a server running in this process (see `served`), with `Server`'s `caption`; `engine` is the
    server's own."""

    def __init__(self, client, port: int, engine):
        self.client, self.port, self.engine = client, port, engine

    def caption(self, png: bytes, **fields):
        return self.client.post("/v1/caption", files={"image": ("x.png", png, "image/png")},
                                data={k: str(v) for k, v in fields.items()})


@contextlib.contextmanager
def served(model: Path, **options) -> Iterator[Served]:
    """What `palionnx serve MODEL` runs, in a thread of this process (real HTTP on a free port; `options` are
    ServeOptions fields): the unit tier's server. Stopped, its engine drained, on leaving."""
    import httpx

    from palionnx.server.options import ServeOptions
    from palionnx.server.serve import prepare

    service = prepare(model, ServeOptions(port=free_port(), **options))
    thread = threading.Thread(target=service.server.run, kwargs={"sockets": [service.sock]}, daemon=True)
    thread.start()
    port = service.sock.getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        deadline = time.time() + 30
        while not service.server.started and thread.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        try:
            yield Served(client, port, service.engine)
        finally:
            service.server.should_exit = True
            thread.join(60)


def png_bytes(count, size=40):
    out = []
    for image in sample_images(count, size=size):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out

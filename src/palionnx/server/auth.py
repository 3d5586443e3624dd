"""API keys (`serve --api-key`): every route but the public ones needs `Authorization: Bearer KEY`.

Keys are compared in constant time (`hmac.compare_digest`), each of them, so the answer's timing says nothing
about how much of a key was right; a request without a valid key gets 401 in the API's JSON error shape.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send


class KeyFileError(ValueError):
    """An --api-key-file that cannot be read or holds no key."""


def read_key_file(path: Path) -> list[str]:
    """The keys in `path`: one per line, blank lines and lines starting with # left out."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the key file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise KeyFileError(f"the key file {path} holds no key (one per line)")
    return keys


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Whether `given` is one of `keys`, every key compared in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


class KeyCheck:
    """ASGI middleware: requests to paths outside `public` need a bearer key from `keys`."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], public: Collection[str]):
        self.app, self.keys, self.public = app, list(keys), set(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.public or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {"message": "this server needs an API key: send Authorization: Bearer KEY",
                                     "type": "authentication_error"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and key_matches(key.strip(), self.keys)

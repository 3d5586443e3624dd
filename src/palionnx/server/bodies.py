"""What every route that reads a body shares: `BadRequest` (answered 400) and the JSON object a body must be."""

from __future__ import annotations

import json
from typing import Any


class BadRequest(ValueError):
    """The request is malformed; the message says what to fix."""


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadRequest naming what is wrong with it otherwise."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest("the JSON body must be an object")
    return payload

"""Streamed answers as server-sent events: `data: JSON` per event, `data: [DONE]` last.

`/v1/chat/completions` with `stream: true` sends OpenAI's `chat.completion.chunk`s: the assistant role first,
then content deltas as tokens decode, then a chunk with `finish_reason` (and, with
`stream_options.include_usage`, one with the usage and no choices). `/v1/caption` sends `{"delta": TEXT}` per
piece and, last, the same JSON as its non-streaming answer. A failure after the stream began is an event
`{"error": {"message", "type"}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..runtime.request import Completion

DONE = "data: [DONE]\n\n"


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class TokenFeed:
    """Tokens from the engine's thread to a stream on the event loop, ended when the request's future is done."""

    END: Any = object()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue[Any]()

    def put(self, token: int) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def close(self, future: Future[Completion]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, self.END)

    async def get(self) -> Any:
        return await self.queue.get()


class CaptionEvents:
    """The events of a streamed /v1/caption."""

    def __init__(self, render: Callable[[Completion], dict[str, Any]]):
        self.render = render

    def start(self) -> list[str]:
        return []

    def delta(self, text: str) -> str:
        return event({"delta": text})

    def end(self, completion: Completion) -> list[str]:
        return [event(self.render(completion))]


class ChatEvents:
    """The `chat.completion.chunk`s of a streamed /v1/chat/completions."""

    def __init__(self, model_name: str, prompt_tokens: int, include_usage: bool):
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.model_name, self.prompt_tokens, self.include_usage = model_name, prompt_tokens, include_usage

    def _chunk(self, delta: dict[str, str], finish: str | None) -> str:
        return event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                      "model": self.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def start(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def delta(self, text: str) -> str:
        return self._chunk({"content": text}, None)

    def end(self, completion: Completion) -> list[str]:
        finish = "length" if len(completion.tokens) >= completion.request.max_new_tokens else "stop"
        chunks = [self._chunk({}, finish)]
        if self.include_usage:
            tokens = len(completion.tokens)
            chunks.append(event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model_name, "choices": [],
                                 "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                                           "total_tokens": self.prompt_tokens + tokens}}))
        return chunks

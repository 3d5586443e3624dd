"""The HTTP API of `palionnx serve` (Starlette; run by uvicorn).

    POST /v1/caption            an image (multipart field `image`, or JSON `{"image": base64}`) + settings;
                                streamed (server-sent events, see events.py) with `stream=true` or
                                `Accept: text/event-stream`
    POST /v1/chat/completions   OpenAI-compatible: a user message with text and an `image_url` data URI;
                                `stream: true` streams chat.completion.chunk events
    GET  /v1/models             OpenAI's model list: the served folder (GET /v1/models/ID: that one)
    GET  /healthz               200 while the engine runs (never needs a key)
    GET  /metrics               Prometheus text format (prometheus_client)

With --api-key every route but /healthz (and /metrics with --metrics-public) needs `Authorization: Bearer
KEY` (auth.py): 401 otherwise.

Errors are JSON `{"error": {"message", "type"}}`: 400 bad input (an undecodable image among them, a setting
out of range), 404 / 405 an unknown route or method, 408 a body that did not arrive within --timeout, 413 a
body over --max-body-mb (or a multipart text field over 1 MB), 503 with Retry-After when --max-queue requests
are waiting, 504 past --timeout. A client that disconnects mid-request is counted as `disconnected`. A bad
request never disturbs the others: each image is decoded on its own, and a caption shares only decode
steps with its neighbours.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..runtime.captioner import Captioner
from ..runtime.contract import MANIFEST_NAME
from ..runtime.defaults import DEFAULT_PROMPT
from ..runtime.generate import SettingError, check_settings, make_logits_processors, make_sampler
from ..runtime.preprocess import ImageLoadError, image_pixels
from ..runtime.request import Completion, Request
from ..runtime.text import TextDeltas
from .auth import KeyCheck
from .bodies import BadRequest, json_object
from .dataset import Dataset, DatasetError
from .engine import Engine, QueueFull, Rejected
from .events import DONE, CaptionEvents, ChatEvents, TokenFeed, event
from .metrics import CONTENT_TYPE
from .pages import PUBLIC_PATHS as PAGE_PATHS
from .pages import page_routes

MAX_PARTS = 100  # fields and files a multipart body may have
MAX_FIELD_BYTES = 2**20  # the largest multipart text field (the image itself is bounded by --max-body-mb)


@dataclass
class Limits:
    """What one request may ask for."""

    max_new_tokens: int  # the most tokens a caption may have (and the default)
    timeout_s: float  # queue wait + captioning
    max_body_bytes: int


@dataclass
class Parsed:
    """A request's image bytes and settings, and whether (and how) to stream the answer."""

    image: bytes
    settings: dict[str, Any]
    stream: bool = False
    include_usage: bool = False  # chat: stream_options.include_usage


Parse = Callable[[HttpRequest, Limits], Awaitable[Parsed]]
PUBLIC_PATHS = ("/healthz",)  # reachable without a key


def create_app(captioner: Captioner, engine: Engine, limits: Limits, model_name: str, keys: Sequence[str] = (),
               metrics_public: bool = False, dataset: Dataset | None = None) -> Starlette:
    """The ASGI app over a started engine (stopped when the app shuts down), with the caption page at / (or,
    given a `dataset`, its review page); with `keys`, every route but /healthz, the pages' files (and /metrics
    when `metrics_public`) needs one of them as a bearer key."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.stop)  # after uvicorn has drained the requests in flight

    api = CaptionRoutes(captioner, engine, limits, model_name)
    routes = [Route("/v1/caption", api.caption, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]), *info_routes(captioner, engine, model_name)]
    routes += page_routes(captioner, engine, model_name, limits.max_new_tokens, dataset,
                          lambda fields: settings(fields, limits))
    public = PUBLIC_PATHS + PAGE_PATHS + (("/metrics",) if metrics_public else ())
    handlers = {HTTPException: _http_error, DatasetError: _dataset_error, BadRequest: _bad_request}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers,  # type: ignore[arg-type]
                     middleware=[Middleware(KeyCheck, keys=keys, public=public)])


class CaptionRoutes:
    """POST /v1/caption and /v1/chat/completions: parse, check, caption on the engine, answer or stream."""

    def __init__(self, captioner: Captioner, engine: Engine, limits: Limits, model_name: str):
        self.captioner, self.engine, self.limits, self.model_name = captioner, engine, limits, model_name
        self.metrics = engine.metrics

    async def caption(self, http: HttpRequest) -> Response:
        def render(completion: Completion, arrived: float) -> dict[str, Any]:
            return caption_json(completion, arrived)

        return await self.answered(http, "/v1/caption", caption_body, render,
                                   lambda parsed, arrived: CaptionEvents(lambda c: caption_json(c, arrived)))

    async def chat(self, http: HttpRequest) -> Response:
        text = self.captioner.text

        def render(completion: Completion, arrived: float) -> dict[str, Any]:
            return chat_json(completion, self.model_name, len(text.prompt_ids(completion.request.prompt)))

        def events(parsed: Parsed, arrived: float) -> ChatEvents:
            tokens = len(text.prompt_ids(parsed.settings["prompt"]))
            return ChatEvents(self.model_name, tokens, parsed.include_usage)

        return await self.answered(http, "/v1/chat/completions", chat_body, render, events)

    async def answered(self, http: HttpRequest, route: str, parse: Parse, render: Callable[[Completion, float], dict],
                       events: Callable[[Parsed, float], CaptionEvents | ChatEvents]) -> Response:
        """One request from its body to its answer (or its stream), its outcome recorded in the metrics."""
        limits, engine = self.limits, self.engine
        arrived = time.perf_counter()
        outcome = "error"
        response: Response = _error(500, "internal error", "server_error")
        try:
            try:  # --timeout covers the whole request: a body that trickles in is cut off too
                parsed = await asyncio.wait_for(parse(http, limits), limits.timeout_s)
            except asyncio.TimeoutError:
                outcome, response = "timeout", _error(408, f"the request body did not arrive within "
                                                           f"{limits.timeout_s:g} s", "timeout")
                return response
            pixels = await run_in_threadpool(image_pixels, io.BytesIO(parsed.image), self.captioner.image_spec)
            if parsed.stream:
                feed = TokenFeed(asyncio.get_running_loop())
                future = engine.submit(Request(pixels, **parsed.settings, on_token=feed.put))
                future.add_done_callback(feed.close)
                outcome = "streaming"  # the stream records its own outcome
                return StreamingResponse(self.streamed(route, future, feed, events(parsed, arrived), arrived),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            future = engine.submit(Request(pixels, **parsed.settings))
            completion = await asyncio.wait_for(asyncio.wrap_future(future), _left(arrived, limits))
            outcome, response = "ok", JSONResponse(render(completion, arrived))
        except _ANSWERED as exc:
            outcome, response = _failure(exc, limits)
        finally:
            if outcome != "streaming":
                self.metrics.record_request(route, outcome, time.perf_counter() - arrived)
        return response

    async def streamed(self, route: str, future: Future[Completion], feed: TokenFeed,
                       events: CaptionEvents | ChatEvents, arrived: float) -> AsyncIterator[str]:
        """The events of one streamed caption; a client that goes away cancels it (its slot frees at the next
        step)."""
        outcome, deltas = "disconnected", TextDeltas(self.captioner.text)
        try:
            for chunk in events.start():
                yield chunk
            while (token := await asyncio.wait_for(feed.get(), _left(arrived, self.limits))) is not TokenFeed.END:
                if delta := deltas.add(token):
                    yield events.delta(delta)
            completion = future.result()  # done: its tokens are all in
            if rest := deltas.finish(completion.text):
                yield events.delta(rest)
            for chunk in events.end(completion):
                yield chunk
            outcome = "ok"
        except (asyncio.TimeoutError, RuntimeError) as exc:
            outcome, failed = _failure(exc, self.limits)
            yield event(json.loads(bytes(failed.body)))
        finally:
            future.cancel()
            self.metrics.record_request(route, outcome, time.perf_counter() - arrived)
        yield DONE


def info_routes(captioner: Captioner, engine: Engine, model_name: str) -> list[Route]:
    """GET /v1/models, /v1/models/{id}, /healthz and /metrics."""

    def model_card() -> dict[str, Any]:
        m = captioner.manifest
        return {"id": model_name, "object": "model", "created": int(manifest_time(captioner)), "owned_by": "palionnx",
                "palionnx": {"level": m.quant.level, "device": captioner.device, "family": m.family,
                             "built_for": m.device, "slots": engine.scheduler.slots}}

    async def models(http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(http: HttpRequest) -> Response:
        wanted = http.path_params["model_id"]
        if wanted != model_name:
            return _error(404, f"no model {wanted!r}: this server serves {model_name!r}", "invalid_request_error")
        return JSONResponse(model_card())

    async def healthz(http: HttpRequest) -> Response:
        alive = engine.thread.is_alive() and not engine.stopping
        return JSONResponse({"status": "ok" if alive else "stopping", "model": model_name,
                             "slots": engine.scheduler.slots, "queue": engine.queue_depth},
                            status_code=200 if alive else 503)

    async def metrics_text(http: HttpRequest) -> Response:
        return Response(engine.metrics.text(), media_type=CONTENT_TYPE)

    return [Route("/v1/models", models), Route("/v1/models/{model_id}", model), Route("/healthz", healthz),
            Route("/metrics", metrics_text)]


def _left(arrived: float, limits: Limits) -> float:
    """Seconds left of the request's --timeout."""
    return max(limits.timeout_s - (time.perf_counter() - arrived), 0.001)


def manifest_time(captioner: Captioner) -> float:
    """When the served folder was exported (its manifest's modification time)."""
    return (captioner.folder / MANIFEST_NAME).stat().st_mtime


class _TooLarge(Exception):
    pass


# What a request can end in besides a caption; `_failure` says how each is answered.
_ANSWERED = (ClientDisconnect, asyncio.CancelledError, _TooLarge, BadRequest, Rejected, ImageLoadError, QueueFull,
             asyncio.TimeoutError, RuntimeError)


def _failure(exc: BaseException, limits: Limits) -> tuple[str, Response]:
    """The metrics outcome and the response of a request that ended in `exc` (one of _ANSWERED)."""
    if isinstance(exc, ClientDisconnect):  # the client went away mid-body: nobody reads an answer
        return "disconnected", Response(status_code=499)
    if isinstance(exc, asyncio.CancelledError):  # the server is shutting down under this request
        return "cancelled", _error(503, "the server is shutting down", "server_busy")
    if isinstance(exc, _TooLarge):
        return "too_large", _error(413, str(exc), "invalid_request_error")
    if isinstance(exc, (BadRequest, Rejected, ImageLoadError)):
        return "bad_request", _error(400, str(exc), "invalid_request_error")
    if isinstance(exc, QueueFull):
        return "queue_full", _error(503, f"busy: {exc}; retry shortly", "server_busy", {"Retry-After": "1"})
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", _error(504, f"no caption within {limits.timeout_s:g} s", "timeout")
    return "error", _error(500, str(exc), "server_error")  # the model failed on the step this caption was in


async def _dataset_error(http: HttpRequest, exc: DatasetError) -> Response:
    return _error(exc.status, str(exc), "invalid_request_error")


async def _bad_request(http: HttpRequest, exc: BadRequest) -> Response:
    return _error(400, str(exc), "invalid_request_error")


async def _http_error(http: HttpRequest, exc: Exception) -> Response:
    """404, 405 and Starlette's other HTTP errors in the API's JSON error shape."""
    status = getattr(exc, "status_code", 500)
    detail = {404: f"no route {http.url.path}: the API has POST /v1/caption, POST /v1/chat/completions, "
                   "GET /v1/models, GET /healthz, GET /metrics and the page at /",
              405: f"{http.method} is not allowed on {http.url.path}"}.get(status, str(getattr(exc, "detail", "")))
    return _error(status, detail, "invalid_request_error", getattr(exc, "headers", None))


async def _body(http: HttpRequest, limits: Limits) -> bytes:
    """The request body, refused (413) past the limit whether or not Content-Length says so."""
    declared = http.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _TooLarge(f"the body is {int(declared)} bytes; the limit is {limits.max_body_bytes}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _TooLarge(f"the body is over the limit of {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def caption_body(http: HttpRequest, limits: Limits) -> Parsed:
    """/v1/caption: multipart (field `image` + settings as fields) or JSON (`image` as base64 or a data URI);
    streamed with a true `stream` field or `Accept: text/event-stream`."""
    body = await _body(http, limits)
    wants_events = "text/event-stream" in http.headers.get("accept", "")
    if http.headers.get("content-type", "").startswith("multipart/form-data"):
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartParser

        async def replay() -> Any:
            yield body

        try:
            form = await MultiPartParser(http.headers, replay(), max_files=MAX_PARTS, max_fields=MAX_PARTS,
                                         max_part_size=MAX_FIELD_BYTES).parse()
        except MultiPartException as exc:
            if "maximum size" in str(exc):
                raise _TooLarge(f"a multipart field is over {MAX_FIELD_BYTES // 2**10} KB") from None
            raise BadRequest(f"the multipart body cannot be read ({exc})") from None
        uploads = form.getlist("image")
        if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
            raise BadRequest("multipart upload needs one file field named 'image'" +
                             (f", not {len(uploads)}" if len(uploads) > 1 else ""))
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key != "image" and isinstance(value, str):
                if key in fields:
                    raise BadRequest(f"the field {key!r} is given twice")
                fields[key] = value
        return Parsed(await uploads[0].read(), settings(fields, limits), _flag(fields, "stream") or wants_events)
    payload = json_object(body)
    if not isinstance(payload.get("image"), str):
        raise BadRequest("JSON body needs 'image': a base64 string or a data: URI")
    return Parsed(_base64_image(payload["image"]), settings(payload, limits), _flag(payload, "stream") or wants_events)


async def chat_body(http: HttpRequest, limits: Limits) -> Parsed:
    """/v1/chat/completions: the last user message's text parts are the prompt, its image_url the image."""
    payload = json_object(await _body(http, limits))
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    users = [m for m in payload.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRequest("messages needs a user message with an image_url part")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise BadRequest("a message's content must be a string or a list of parts ({\"type\": \"text\", ...}, "
                         "{\"type\": \"image_url\", ...})")
    texts = [p.get("text", "") for p in parts if p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("a text part's 'text' must be a string")
    images = [p.get("image_url") for p in parts if p.get("type") == "image_url"]
    if len(images) != 1:
        raise BadRequest("the user message needs exactly one image_url part")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest("image_url must be a data: URI (data:image/png;base64,...); URLs are not fetched")
    fields = {"prompt": " ".join(t for t in texts if t).strip() or DEFAULT_PROMPT,
              "max_new_tokens": payload.get("max_completion_tokens", payload.get("max_tokens")),
              **{k: payload.get(k) for k in ("temperature", "top_p", "top_k", "seed", "repetition_penalty")}}
    return Parsed(_base64_image(url), settings(fields, limits), _flag(payload, "stream"),
                  _flag(options, "include_usage"))


def _flag(fields: dict[str, Any], name: str) -> bool:
    """A yes/no field: JSON true/false, or a form's true/false/1/0 (absent: false)."""
    value = fields.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", ""):
        return value.lower() in ("true", "1")
    raise BadRequest(f"{name} must be true or false, not {value!r}")


def settings(fields: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Request settings from form fields (strings) or JSON, checked as the CLI checks its options
    (`runtime.generate.check_settings`): prompt, max_new_tokens and sampling options."""

    def number(name: str, kind: type, default: Any) -> Any:
        value = fields.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, str):
            try:
                value = int(value) if kind is int else float(value)
            except ValueError:
                raise BadRequest(f"{name} must be a{'n integer' if kind is int else ' number'}, not {value!r}") \
                    from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            raise BadRequest(f"{name} must be a{'n integer' if kind is int else ' number'}, not {value!r}")
        return kind(value)

    prompt = fields.get("prompt") or DEFAULT_PROMPT
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    values = {"temperature": number("temperature", float, 0.0), "top_k": number("top_k", int, 0),
              "top_p": number("top_p", float, 1.0), "seed": number("seed", int, None),
              "repetition_penalty": number("repetition_penalty", float, 1.0),
              "no_repeat_ngram_size": number("no_repeat_ngram_size", int, 0)}
    max_new_tokens = number("max_new_tokens", int, limits.max_new_tokens)
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise BadRequest(f"max_new_tokens must be between 1 and {limits.max_new_tokens}")
    try:
        check_settings(**values)
    except SettingError as exc:
        raise BadRequest(str(exc)) from None
    return {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "sampler": make_sampler(values["temperature"], values["top_k"], values["top_p"], values["seed"]),
        "logits_processors": make_logits_processors(values["repetition_penalty"], values["no_repeat_ngram_size"]),
    }


def caption_json(completion: Completion, arrived: float) -> dict[str, Any]:
    total = time.perf_counter() - arrived
    working = completion.vision_s + completion.prefill_s + completion.decode_s
    return {"caption": completion.text, "tokens": len(completion.tokens),
            "timings": {"queue_s": round(max(total - working, 0.0), 4), "vision_s": round(completion.vision_s, 4),
                        "prefill_s": round(completion.prefill_s, 4), "decode_s": round(completion.decode_s, 4),
                        "total_s": round(total, 4)}}


def chat_json(completion: Completion, model_name: str, prompt_tokens: int) -> dict[str, Any]:
    """An OpenAI chat.completion; prompt_tokens counts the image tokens too."""
    finish = "length" if len(completion.tokens) >= completion.request.max_new_tokens else "stop"
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(completion.tokens),
                      "total_tokens": prompt_tokens + len(completion.tokens)}}


def _base64_image(text: str) -> bytes:
    """An image given as base64, or as a data: URI (data:image/png;base64,...)."""
    data = text
    if text.startswith("data:"):
        header, comma, data = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadRequest("a data: URI must read data:<type>;base64,<the image in base64>")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the image is not valid base64") from None


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

"""The pages `palionnx serve` serves itself (no build step, nothing from outside the package): at `/` the caption
page, or with `--folder DIR` the review page of that dataset, and the JSON routes they call.

    GET  /                          index.html (review.html in folder mode); /static/NAME its scripts and style
    GET  /v1/page                   the model, the default prompt and tokens, the presets
    GET  /v1/dataset                folder mode: every image with its caption and status, the recaptioning
    GET  /v1/dataset/image?path=P   an image of the folder
    PUT  /v1/dataset/caption?path=P {"caption": TEXT}: saved atomically (403 read-only, 409 claimed by a run)
    POST /v1/dataset/recaption      {"paths": [...], settings...}: caption those images again, in the background

The pages and their static files need no key (they hold nothing); every JSON route does, when keys are set.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..jobs.presets import sampling_presets
from ..runtime.captioner import Captioner
from ..runtime.defaults import DEFAULT_PROMPT
from .bodies import json_object
from .dataset import Dataset, DatasetError
from .engine import Engine

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"common.js": "text/javascript", "app.js": "text/javascript", "review.js": "text/javascript",
                "style.css": "text/css"}
PUBLIC_PATHS = ("/",) + tuple(f"/static/{name}" for name in STATIC_FILES)
Settings = Callable[[dict[str, Any]], dict[str, Any]]  # request fields -> checked request settings


def page_routes(captioner: Captioner, engine: Engine, model_name: str, max_new_tokens: int,
                dataset: Dataset | None, settings: Settings) -> list[Route]:
    """The pages' routes; `settings` turns a request's fields into checked settings (BadRequest otherwise)."""

    async def index(http: HttpRequest) -> Response:
        return FileResponse(STATIC / ("review.html" if dataset else "index.html"), media_type="text/html")

    async def page(http: HttpRequest) -> Response:
        return JSONResponse({"model": model_name, "level": captioner.manifest.quant.level, "device": captioner.device,
                             "prompt": DEFAULT_PROMPT, "max_new_tokens": max_new_tokens,
                             "presets": sampling_presets(), "folder": str(dataset.root) if dataset else None})

    routes = [Route("/", index), Route("/v1/page", page)]
    routes += [Route(f"/static/{name}", _static_file(name)) for name in STATIC_FILES]
    if dataset is not None:
        routes += dataset_routes(dataset, captioner, engine, settings)
    return routes


def _static_file(name: str) -> Callable[[HttpRequest], Any]:
    """The route of one of the package's static files (a fixed list: no path from a request is opened)."""

    async def serve_file(http: HttpRequest) -> Response:
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    return serve_file


def dataset_routes(dataset: Dataset, captioner: Captioner, engine: Engine, settings: Settings) -> list[Route]:
    """The folder mode's JSON routes (see the module docstring)."""

    async def listing(http: HttpRequest) -> Response:
        return JSONResponse(dataset.listing())

    async def image(http: HttpRequest) -> Response:
        job = dataset.job(http.query_params.get("path", ""))
        media = mimetypes.guess_type(job.image.name)[0] or "application/octet-stream"
        return FileResponse(job.image, media_type=media)

    async def caption(http: HttpRequest) -> Response:
        body = json_object(await http.body())
        text = body.get("caption")
        if not isinstance(text, str):
            raise DatasetError(400, "the body needs 'caption': the caption's text")
        dataset.save(http.query_params.get("path", ""), text)
        return JSONResponse({"saved": True})

    async def recaption(http: HttpRequest) -> Response:
        body = json_object(await http.body())
        paths = body.pop("paths", None)
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise DatasetError(400, "the body needs 'paths': a list of the folder's image paths")
        dataset.recaption(paths, captioner, engine, settings(body))
        return JSONResponse(dataset.progress.to_json(), status_code=202)

    return [Route("/v1/dataset", listing), Route("/v1/dataset/image", image),
            Route("/v1/dataset/caption", caption, methods=["PUT"]),
            Route("/v1/dataset/recaption", recaption, methods=["POST"])]

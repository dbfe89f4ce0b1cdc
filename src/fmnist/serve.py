"""``fmnist serve``: the trained model over HTTP, a JSON API and a web page, on ``fmnist predict``'s code path.

``POST /predict`` takes pictures (multipart form files, or one picture as the raw request body) and answers
what ``fmnist predict --json`` prints for them, with each picture as the model saw it (a 28x28 PNG).
``GET /`` is a page for trying it in a browser, ``GET /model`` describes the checkpoint, ``GET /healthz``
says the server is up, and ``GET /openapi.json`` is the API's schema.

Whatever a client sends ends in a JSON error with a 4xx status, never a crash or a stuck worker: a body
over :data:`MAX_BODY` bytes (413), a body that takes longer than :data:`BODY_SECONDS` to arrive (408),
a content type other than a picture or a form (415), a file that is not a picture, is truncated, or
decodes to more than ``predict.MAX_PIXELS`` pixels (422), a malformed form or one of more than
:data:`MAX_FILES` files (400).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import CLASSES, predict
from .errors import PipelineError
from .runtime import available_cores, resolve_device

MAX_BODY = 20 * 1024 * 1024  # bytes in one request: a few phone photos
MAX_FILES = 16  # pictures in one form
BODY_SECONDS = 10.0  # for the whole body to arrive: a client trickling it holds a connection no longer
PAGE = Path(__file__).with_name("page.html")
EVAL_METRICS = "metrics/eval.json"  # the evaluate stage's metrics, in the repository holding dvc.lock


class Guess(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", description="the class's name", examples=["Sneaker"])
    index: int = Field(ge=0, le=len(CLASSES) - 1, description="the class's index in the data set's labels")
    probability: float = Field(ge=0, le=1)


class Classified(BaseModel):
    file: str = Field(description="the uploaded file's name ('upload' for a raw body)")
    width: int = Field(description="the picture's width as read, in pixels")
    height: int
    inverted: bool = Field(description="whether its light background was made dark, as the training images")
    top: list[Guess] = Field(description="the most probable classes, most probable first")
    picture: str = Field(description="the picture as the model saw it: a data: URL of a 28x28 grey PNG")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class _BodyLimits:
    """ASGI middleware: a request body is refused (413) past ``max_bytes``, announced or sent, and (408)
    when it has not all arrived within ``seconds``. The errors rise from the body's reads, inside the
    endpoint, so FastAPI turns them into its usual JSON errors."""

    def __init__(self, app: ASGIApp, max_bytes: int, seconds: float):
        self.app, self.max_bytes, self.seconds = app, max_bytes, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = HTTPException(413, f"the request is over {self.max_bytes // 2**20} MiB")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            scope["fmnist.refused"] = too_large if length.isdigit() else HTTPException(400, "bad Content-Length")
        deadline = asyncio.get_running_loop().time() + self.seconds
        received = 0

        async def limited() -> Message:
            nonlocal received
            if "fmnist.refused" in scope:
                raise scope["fmnist.refused"]
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0))
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited, send)


def _locked(model: Path) -> tuple[str | None, dict | None]:
    """(the MD5 the repository's ``dvc.lock`` records for ``model``, the evaluate stage's metrics), from the
    first folder above ``model`` holding a ``dvc.lock``; (None, None) outside a repository or when it does not
    record that path."""
    model = model.resolve()
    lock = next((folder / "dvc.lock" for folder in model.parents if (folder / "dvc.lock").is_file()), None)
    try:
        stages = yaml.safe_load(lock.read_text())["stages"]
        md5 = next(out["md5"] for stage in stages.values() for out in stage.get("outs", [])
                   if (lock.parent / out["path"]).resolve() == model)
    except (AttributeError, OSError, KeyError, TypeError, StopIteration, yaml.YAMLError):
        return None, None
    try:
        evaluated = json.loads((lock.parent / EVAL_METRICS).read_text())
    except (OSError, ValueError):
        evaluated = None
    return md5, evaluated


def _png(pixels) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _uploads(request: Request) -> list[tuple[str, bytes]]:
    """The request's pictures as (name, bytes): a form's files, or the raw body as one picture."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(422, "the form has no files: send pictures as file fields")
        return [(f.filename or "upload", await f.read()) for f in files]
    if kind.startswith("image/") or kind == "application/octet-stream":
        return [("upload", await request.body())]
    raise HTTPException(415, f"cannot take {kind or 'a body without a Content-Type'}: send a picture "
                             "(image/*) or a multipart/form-data form of them")


def worker_app() -> FastAPI:
    """The app for each of uvicorn's worker processes (``fmnist serve --workers N``), configured through the
    environment that ``fmnist serve`` sets for them (``OMP_NUM_THREADS``: its share of the cores)."""
    return create_app(os.environ["FMNIST_SERVE_MODEL"], os.environ["FMNIST_SERVE_DEVICE"],
                      float(os.environ["FMNIST_SERVE_BODY_SECONDS"]))


def create_app(model: str | Path = "models/model.pt", device: str = "auto", body_seconds: float = BODY_SECONDS,
               ) -> FastAPI:
    """The app, with the checkpoint ``model`` loaded on ``device``: a missing or bad checkpoint raises its
    one-line error here, before any request. A request body must arrive within ``body_seconds``."""
    model = Path(model)
    where = resolve_device(device, setting="--device")
    net, info = predict.load_model(model, where)
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    locked_md5, evaluated = _locked(model)
    if locked_md5 != md5:  # the evaluate stage's figures are this checkpoint's only when dvc.lock says so
        evaluated = None
    described = {
        "model": info["model"], "device": where.type,
        "checkpoint": {"path": str(model), "md5": md5, "dvc_lock_md5": locked_md5},
        "params": info["params"], "metrics": {"train": info.get("metrics", {}), "eval": evaluated},
        "environment": info.get("environment", {}),
    }

    app = FastAPI(title="fmnist", summary="Classify pictures of clothing as Fashion-MNIST's ten classes",
                  version="1", docs_url=None, redoc_url=None)  # their pages load scripts from a CDN
    app.add_middleware(_BodyLimits, max_bytes=MAX_BODY, seconds=body_seconds)

    slots = asyncio.Semaphore(available_cores())  # pictures decoded at once: bounds memory as well as CPU

    def classify(uploads: list[tuple[str, bytes]], top: int, invert: str, crop: bool, tta: bool) -> list[dict]:
        pictures = []
        for name, data in uploads:
            try:
                pictures.append(predict.read_picture(io.BytesIO(data), invert, crop, name=name))
            except PipelineError as e:
                raise HTTPException(422, str(e)) from None
        return [predict.as_record(r, top) | {"picture": _png(r.picture.pixels)}
                for r in predict.classify(net, info, pictures, where, tta=tta)]

    @app.post("/predict", response_model=list[Classified], openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
            "type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": MAX_FILES}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}},
        responses={code: {"description": why} for code, why in (
            (400, "a malformed form, or too many files"), (408, "the body arrived too slowly"), (413, "too large"),
            (415, "not a picture or a form"), (422, "a file is not a picture that can be read"))})
    async def predict_pictures(
        request: Request,
        top: Annotated[int, Query(ge=1, le=len(CLASSES), description="classes per picture")] = 3,
        invert: Annotated[Literal["auto", "yes", "no"], Query(description="make a light background dark")] = "auto",
        crop: Annotated[bool, Query(description="crop to the item before resizing")] = True,
        tta: Annotated[bool, Query(description="average with the mirror image")] = False,
    ) -> list[dict]:
        """Classify pictures as ``fmnist predict --json`` does: one entry per picture, in the order sent."""
        uploads = await _uploads(request)
        async with slots:
            return await run_in_threadpool(classify, uploads, top, invert, crop, tta)

    @app.get("/model")
    def describe() -> dict:
        """The checkpoint served: its model, training parameters and metrics, the evaluate stage's metrics
        (when ``dvc.lock`` records this checkpoint), the environment it was trained in, its MD5."""
        return described

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health()

    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    return app

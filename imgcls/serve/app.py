"""The FastAPI application: routes, errors as JSON, the API key and the metrics.

:func:`create_app` builds one app around one :class:`imgcls.serve.model.ServedModel`.
Everything an app counts lives on it (its own Prometheus registry, its own
batcher): two apps in one process share nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from imgcls.data.decode import DecodeError
from imgcls.errors import UsageError
from imgcls.serve.batching import Batcher, Overloaded, Stopped
from imgcls.serve.model import ServedModel
from imgcls.serve.uploads import BadUpload, multipart_files, read_body

RAW_TYPES = ("image/", "application/octet-stream")
_ROUTES = ("/", "/page.js", "/healthz", "/metrics", "/v1/model", "/v1/predict", "/v1/explain", "/docs")
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body (image/* or application/octet-stream), "
        "or several as multipart/form-data files.",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
        },
    }
}
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class ServeOptions:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_upload: int = 20_000_000  # bytes per request
    api_key: str | None = None
    top_k: int = 3
    read_timeout: float = 30.0  # seconds for a request body to arrive
    retry_after: int = 1  # seconds, told to clients turned away with 503
    decoders: int | None = None  # images decoded at once (default: one per core)


class Metrics:
    """The app's own Prometheus registry (never the process-global one)."""

    def __init__(self, batcher: Batcher):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imgcls_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "imgcls_request_seconds",
            "Time to answer a request",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch = Histogram(
            "imgcls_batch_size",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.images = Counter("imgcls_images", "Images predicted", registry=r)
        Gauge("imgcls_queue_depth", "Images waiting for the model", registry=r).set_function(
            lambda: batcher.depth
        )
        Gauge(
            "imgcls_requests_admitted",
            "Requests inside the server (reading, decoding, queued, running)",
            registry=r,
        ).set_function(lambda: batcher.admitted)


class _Measure:
    """Pure ASGI middleware: count and time every HTTP request by route (unknown paths as 'other')."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        status = [500]
        start = time.perf_counter()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-content-type-options", b"nosniff"))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status[0])).inc()


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers=headers)


def _page_file(name: str) -> bytes:
    return resources.files("imgcls.serve").joinpath(name).read_bytes()


def create_app(served: ServedModel, options: ServeOptions | None = None) -> FastAPI:
    """The ASGI app serving ``served``; its batcher starts and stops with the app's lifespan."""
    opts = options or ServeOptions()
    batcher = Batcher(
        lambda images: list(served.logits(images)),
        max_batch=opts.max_batch,
        max_wait_s=opts.max_wait_ms / 1000,
        max_queue=opts.max_queue,
    )
    metrics = Metrics(batcher)

    def counted(n: int) -> None:
        metrics.batch.observe(n)
        metrics.images.inc(n)

    batcher.on_batch = counted

    @asynccontextmanager
    async def lifespan(app):
        # decodes at once: one per core, so a burst of large images holds at most
        # that many decoded at a time (memory), and threads do not fight for the cores
        app.state.decoders = anyio.CapacityLimiter(opts.decoders or os.cpu_count() or 1)
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)  # what is queued is answered first

    app = FastAPI(
        title="imgcls serve",
        version=served.info.version,
        description=f"{served.info.name}: an imgcls image classifier ({served.info.format}).",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.metrics, app.state.served = batcher, metrics, served
    _errors(app, opts)
    _routes(app, served, batcher, metrics, opts)
    app.add_middleware(_Measure, metrics=metrics)
    return app


def _errors(app: FastAPI, opts: ServeOptions) -> None:
    @app.exception_handler(BadUpload)
    async def bad_upload(request, exc: BadUpload):
        return _error(exc.status, exc.message)

    @app.exception_handler(Overloaded)
    async def overloaded(request, exc):
        return _error(
            503,
            f"busy: {opts.max_queue} requests are already being served; retry after {opts.retry_after} s",
            {"Retry-After": str(opts.retry_after)},
        )

    @app.exception_handler(Stopped)
    async def stopped(request, exc):
        return _error(503, "shutting down", {"Retry-After": str(opts.retry_after), "Connection": "close"})

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")


def _key_check(api_key: str | None):
    """A dependency: 401 unless the request carries ``api_key`` (X-API-Key or Authorization: Bearer)."""
    want = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if want is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), want):
            raise HTTPException(
                401,
                "missing or wrong API key (send it as the X-API-Key header)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


async def images_of(
    request: Request, served: ServedModel, opts: ServeOptions
) -> list[tuple[str | None, object]]:
    """The request's images, decoded off the event loop: (file name or None, uint8 tensor)."""
    ctype = request.headers.get("content-type", "")
    kind = ctype.split(";")[0].strip().lower()
    multipart = kind == "multipart/form-data"
    if not multipart and not kind.startswith(RAW_TYPES):
        got = f"Content-Type {kind!r}" if kind else "no Content-Type"
        raise BadUpload(
            415,
            f"{got}: send one image as the body with Content-Type image/* or application/octet-stream "
            "(curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg'), or files as multipart/form-data "
            "(curl -F file=@photo.jpg)",
        )
    body = await read_body(request, opts.max_upload, opts.read_timeout)
    if not body:
        raise BadUpload(400, "empty body: no image")
    uploads: list[tuple[str | None, bytes]] = (
        list(multipart_files(body, ctype)) if multipart else [(None, body)]
    )

    def decode_all():
        return [(name, served.decode(data, name or "upload")) for name, data in uploads]

    try:
        return await anyio.to_thread.run_sync(decode_all, limiter=request.app.state.decoders)
    except DecodeError as exc:
        raise BadUpload(422, str(exc)) from None


def _routes(
    app: FastAPI, served: ServedModel, batcher: Batcher, metrics: Metrics, opts: ServeOptions
) -> None:
    keyed = [Depends(_key_check(opts.api_key))]
    identity = {"name": served.info.name, "version": served.info.version}

    @app.get("/", include_in_schema=False)
    async def page():
        return Response(
            _page_file("page.html"),
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": _PAGE_CSP},
        )

    @app.get("/page.js", include_in_schema=False)
    async def page_js():
        return Response(_page_file("page.js"), media_type="text/javascript; charset=utf-8")

    @app.get("/healthz", summary="Liveness: 200 while the model answers")
    async def healthz():
        return {"status": "ok", "queue": batcher.depth}

    @app.get("/metrics", dependencies=keyed, summary="Prometheus metrics (text format)")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", dependencies=keyed, summary="The model: classes, input size, preprocessing, format")
    async def model_info():
        return {
            **served.public,
            "server": {
                "max_batch": opts.max_batch,
                "max_wait_ms": opts.max_wait_ms,
                "max_queue": opts.max_queue,
                "max_upload": opts.max_upload,
                "top_k": opts.top_k,
            },
        }

    @app.post(
        "/v1/predict",
        dependencies=keyed,
        openapi_extra=_IMAGE_BODY,
        summary="Labels, probabilities and top-k for one image (raw body) or several (multipart)",
    )
    async def predict(request: Request, top_k: Annotated[int | None, Query(ge=1)] = None):
        batcher.admit()
        arrived = False
        try:
            images = await images_of(request, served, opts)
            futures = batcher.submit([pixels for _, pixels in images])
            batcher.arrived()
            arrived = True
            rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            import torch

            answers = served.answers(torch.stack(rows), top_k or opts.top_k, [name for name, _ in images])
        finally:
            if not arrived:
                batcher.arrived()
            batcher.leave()
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            return {"model": identity, "predictions": answers}
        return {"model": identity, **answers[0]}

    _explain_route(app, served, batcher, keyed, opts)


def _explain_route(
    app: FastAPI, served: ServedModel, batcher: Batcher, keyed: list, opts: ServeOptions
) -> None:
    @app.post(
        "/v1/explain",
        dependencies=keyed,
        openapi_extra=_IMAGE_BODY,
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
        summary="Grad-CAM overlay (PNG) for one image: the predicted class, or ?class=NAME",
    )
    async def explain(request: Request, target: Annotated[str | None, Query(alias="class")] = None):
        if served.explain_layer is None:
            raise HTTPException(409, served.explain_unavailable or "Grad-CAM is not available")
        batcher.admit()
        arrived = False
        try:
            images = await images_of(request, served, opts)
            batcher.arrived()
            arrived = True
            if len(images) != 1:
                raise BadUpload(400, "explain takes one image")
            work = batcher.call(lambda: served.explain_png(images[0][1], target))  # type: ignore[arg-type]
            try:
                png, shown = await asyncio.wrap_future(work)
            except UsageError as exc:
                raise BadUpload(400, str(exc)) from None
        finally:
            if not arrived:
                batcher.arrived()
            batcher.leave()
        return Response(png, media_type="image/png", headers={"X-Explained-Class": _header_safe(shown)})


def _header_safe(text: str) -> str:
    """A class name in a response header: percent-encoded (names are data, any Unicode)."""
    from urllib.parse import quote

    return quote(text, safe="")

"""The FastAPI application: ``create_app(settings, backends=None)``.

Endpoints: ``/healthz``, ``/readyz``, ``/v1/models``, ``/v1/detect``, ``/v1/detect/stream`` (NDJSON or SSE),
``/v1/video`` (NDJSON per frame), ``WS /v1/stream`` (live frames, latest wins), ``/`` (web page), ``/metrics``,
``/docs`` and ``/redoc`` (served from the package, no CDN). Every error is JSON ``{"error": code, "detail": text}``
with a stable code; exception texts go to the log, never into a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from fastapi import Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from detector.detect import KEYFRAME_EVERY

from .backends import Backend, Params, load_backend, scale_detections, warmup
from .config import IMAGE_CONTENT_TYPES, Settings
from .errors import ServiceError
from .imaging import (ByteBudget, check_shape, decode_for, fit_frame, header_size, set_pixel_limit,
                      working_bytes)
from .metrics import Metrics
from .schemas import DetectResponse, ErrorResponse, Health, ModelList, Ready, StreamStep, VideoFrame
from .video import container_of, open_video, read_frame, save_upload
from .worker import Job, ModelWorker, QueueFull

log = logging.getLogger("casc.service")
STATIC = Path(__file__).resolve().parent / "static"
SLEEP_PATTERN = r"^(auto|[0-9]{1,3})$"
KNOWN_PATHS = {"/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/detect", "/v1/detect/stream",
               "/v1/video", "/v1/stream", "/demo-image", "/openapi.json", "/docs", "/redoc"}
STATUS_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                406: "not_acceptable", 408: "body_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "invalid_parameter", 429: "too_many_requests", 503: "unavailable", 504: "timeout"}
VIDEO_TYPES = {"application/octet-stream", "video/mp4", "video/x-msvideo", "video/avi", "video/quicktime",
               "video/webm", "video/x-matroska"}
WS_CLOSE_POLICY, WS_CLOSE_GOING_AWAY, WS_CLOSE_TRY_AGAIN = 1008, 1001, 1013
PROBE_PATHS = {"/healthz", "/readyz", "/metrics"}  # always answered (never counted by admission)
DISCARD_BYTES, DISCARD_S = 32 << 20, 2.0  # what a refused request's body may still send before the 503


class DetectParams(BaseModel):
    """Query or form parameters shared by the detection endpoints (validated in one place; the bounds that
    depend on the model and the settings in ``params``)."""

    model_config = {"extra": "forbid"}

    model: Optional[str] = Field(None, max_length=200)
    wake: Optional[int] = Field(None, ge=1, le=999)
    sleep: Optional[str] = Field(None, pattern=SLEEP_PATTERN)
    burst: Optional[int] = Field(None, ge=1, le=999)
    max_sleep: Optional[int] = Field(None, ge=1, le=999)
    conf: float = Field(0.25, ge=0.0, le=1.0)
    iou: float = Field(0.7, ge=0.0, le=1.0)
    max_det: int = Field(300, ge=1, le=1000)

    def params(self, backend: Backend, settings: Settings) -> Params:
        max_wake = settings.wake_limit(backend.levels)
        if self.wake is not None and self.wake > max_wake:
            raise ServiceError(422, "invalid_parameter", f"wake: at most {max_wake} for model {backend.name!r}")
        sleep: int | str = "auto" if self.sleep in (None, "auto") else int(self.sleep)
        if isinstance(sleep, int) and sleep > settings.max_sleep:
            raise ServiceError(422, "invalid_parameter", f"sleep: 'auto' or an integer 0..{settings.max_sleep}")
        if self.max_sleep is not None and self.max_sleep > settings.max_sleep:
            raise ServiceError(422, "invalid_parameter", f"max_sleep: at most {settings.max_sleep}")
        wake = self.wake or backend.levels
        if self.burst is not None and self.burst > wake:
            raise ServiceError(422, "invalid_parameter", f"burst: 1..{wake} (the wake count)")
        return Params(wake=self.wake, sleep=sleep, conf=float(self.conf), iou=float(self.iou), max_det=self.max_det,
                      burst=self.burst, max_sleep=self.max_sleep or settings.max_sleep)


QUERY_NAMES = set(DetectParams.model_fields)


def _validation_detail(error: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in error.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{loc or 'request'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _detect_query(model: Optional[str] = Query(None, description="model name (GET /v1/models); default: the "
                                               "first loaded", max_length=200),
                  wake: Optional[int] = Query(None, ge=1, le=999, description="wake steps (default: levels L; "
                                              "at most --max-wake, default 4 L)"),
                  sleep: Optional[str] = Query(None, pattern=SLEEP_PATTERN,
                                               description="sleep steps 0..--max-sleep or 'auto' (default)"),
                  burst: Optional[int] = Query(None, ge=1, le=999, description="spikes per neuron per sleep step "
                                               "(default: the wake count; 1: one spike per step)"),
                  max_sleep: Optional[int] = Query(None, ge=1, le=999, description="cap of sleep='auto' "
                                                   "(default and limit: --max-sleep)"),
                  conf: Optional[float] = Query(None, ge=0.0, le=1.0, description="score threshold (0.25)"),
                  iou: Optional[float] = Query(None, ge=0.0, le=1.0, description="NMS IoU (0.7)"),
                  max_det: Optional[int] = Query(None, ge=1, le=1000, description="max detections (300)")) -> dict:
    values = {"model": model, "wake": wake, "sleep": sleep, "burst": burst, "max_sleep": max_sleep, "conf": conf,
              "iou": iou, "max_det": max_det}
    return {k: v for k, v in values.items() if v is not None}


def _request_body(description: str, media: dict[str, dict], extra_fields: dict | None = None) -> dict:
    form_props = {"file": {"type": "string", "format": "binary"},
                  "model": {"type": "string"}, "wake": {"type": "integer", "minimum": 1},
                  "sleep": {"type": "string", "pattern": SLEEP_PATTERN},
                  "burst": {"type": "integer", "minimum": 1}, "max_sleep": {"type": "integer", "minimum": 1},
                  "conf": {"type": "number", "minimum": 0, "maximum": 1},
                  "iou": {"type": "number", "minimum": 0, "maximum": 1},
                  "max_det": {"type": "integer", "minimum": 1, "maximum": 1000}, **(extra_fields or {})}
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": form_props, "required": ["file"],
                                                  "additionalProperties": False}}}
    content.update({m: {"schema": {"type": "string", "format": "binary"}} for m in media})
    return {"requestBody": {"required": True, "description": description, "content": content}}


IMAGE_BODY = _request_body("the image: multipart field `file`, or the raw bytes with an image content type",
                           {"image/jpeg": {}, "image/png": {}, "image/webp": {}, "image/bmp": {}})
VIDEO_BODY = _request_body("the video (MP4/MOV, AVI, Matroska/WebM): multipart field `file`, or the raw bytes "
                           "(video/*, application/octet-stream)",
                           {"video/mp4": {}, "video/x-msvideo": {}, "application/octet-stream": {}},
                           {"every": {"type": "integer", "minimum": 1, "maximum": 1000}})
ERRORS = {code: {"model": ErrorResponse} for code in (400, 403, 404, 408, 413, 415, 422, 500, 503, 504)}


def sleep_pattern(max_sleep: int) -> str:
    """The regular expression of ``sleep``: 'auto' or an integer 0..``max_sleep``."""
    return "^(auto|" + "|".join(str(n) for n in range(int(max_sleep) + 1)) + ")$"


def state_bounds(schema: dict, max_wake: int, max_sleep: int) -> dict:
    """The OpenAPI ``schema`` with the bounds the server enforces (the declared ones are the widest any model
    could take): wake and burst up to ``max_wake``, max_sleep up to ``max_sleep``, sleep matching 0..``max_sleep``;
    and the response models' ``$defs`` moved to ``components/schemas`` so that every ``$ref`` resolves."""
    limits = {"wake": max_wake, "burst": max_wake, "max_sleep": max_sleep}
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def bound(name: str, node: dict) -> None:
        for part in [node, *node.get("anyOf", [])]:
            if name in limits and part.get("type") == "integer":
                part["maximum"] = limits[name]
            elif name == "sleep" and part.get("type") == "string":
                part["pattern"] = sleep_pattern(max_sleep)

    def walk(node):
        if isinstance(node, dict):
            components.update(node.pop("$defs", {}))
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                    node[key] = "#/components/schemas/" + value[len("#/$defs/"):]
                else:
                    walk(value)
            if node.get("in") == "query" and "schema" in node:
                bound(node.get("name", ""), node["schema"])
            for name, prop in (node.get("properties") or {}).items():
                if isinstance(prop, dict) and "file" in node.get("properties", {}):
                    bound(name, prop)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def own_origins(host: str, port: int) -> list[str]:
    """The origins of the pages this server serves, from the address it listens on (never from a request's
    ``Host`` header, which a DNS-rebinding page sets to anything). Listening on a loopback or wildcard address:
    the loopback names; a public name has to be given with ``--allow-origin``."""
    names = LOOPBACK_HOSTS if host in WILDCARD_HOSTS or host in ("127.0.0.1", "localhost", "::1") else \
        (f"[{host}]" if ":" in host else host,)
    return [f"http://{name}:{port}" for name in names]


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    """No ``Origin`` (not a browser): allowed. Else the page's origin must be in ``allowed`` (the configured
    list and this server's own origins)."""
    if not origin:
        return True
    return "*" in allowed or origin.lower().rstrip("/") in allowed


class _PartsInMemory(MultiPartParser):
    """Starlette's multipart parser, but a file part stays in memory (counted by the byte budget) instead of
    spilling to a temp file over 1 MB: /tmp is a small emptyDir in deploy/k8s, budgeted for videos only."""

    spool_max_size = 1 << 40


class _MetricsMiddleware:
    """Counts requests and their latency (until the response body ends) per endpoint template."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in KNOWN_PATHS else ("/static" if path.startswith("/static") else "other")
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status["code"],
                                         time.perf_counter() - start)


class _OriginMiddleware:
    """Requests a browser sends from a page of another origin are refused (403); WebSockets are checked in
    their handler (a close code, not an HTTP reply)."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not origin_allowed(headers.get("origin"), self.allowed):
                response = JSONResponse({"error": "origin_not_allowed", "detail": "requests from this page's "
                                         "origin are not allowed (casc serve --allow-origin)"}, status_code=403)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _AdmissionMiddleware:
    """At most ``limit`` requests and WebSockets in flight; the rest are refused at once with the service's JSON
    503 and Retry-After (a WebSocket: close code 1013, try again later). Probes (``PROBE_PATHS``) are never
    counted nor refused, so liveness and readiness are answered whatever the load. This replaces uvicorn's
    ``limit_concurrency``, which counts open connections: idle sockets would refuse every request, probes too."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, int(limit), metrics
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("path") in PROBE_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            self.metrics.reject("-", "over_limit")
            if scope["type"] == "websocket":  # accepted only to say why it closes (a refused handshake is a bare 403)
                await receive()
                await send({"type": "websocket.accept"})
                return await send({"type": "websocket.close", "code": WS_CLOSE_TRY_AGAIN,
                                   "reason": f"busy: {self.limit} requests in flight"})
            response = JSONResponse({"error": "busy", "detail": f"the service is at its limit of {self.limit} "
                                     "requests in flight; retry after the Retry-After seconds"}, status_code=503,
                                    headers={"Retry-After": "1"})
            await self.discard_body(receive)
            return await response(scope, receive, send)
        self.active += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def discard_body(self, receive) -> None:
        """Read (and drop) what the client is still sending, up to ``DISCARD_BYTES`` for ``DISCARD_S``: a reply
        sent over an unread body makes the close a TCP reset, and the client would see no 503 at all."""
        end, size = time.monotonic() + DISCARD_S, 0
        with contextlib.suppress(asyncio.TimeoutError):
            while size <= DISCARD_BYTES:
                message = await asyncio.wait_for(receive(), max(0.001, end - time.monotonic()))
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
                size += len(message.get("body", b""))


def create_app(settings: Settings | None = None, backends: dict[str, Backend] | None = None):
    settings = settings or Settings()
    set_pixel_limit(settings.max_pixels)
    metrics = Metrics()
    state: dict = {"backends": dict(backends or {}), "workers": {}, "ready": False, "stopping": False}
    budget = ByteBudget(settings.max_inflight_bytes)
    disk = ByteBudget(settings.max_video_disk_bytes, "on disk (video temp files)", "video_too_large")
    state.update(budget=budget, disk=disk)

    def _workers() -> dict[str, ModelWorker]:
        return state["workers"]

    metrics.queue_depth = lambda: {name: w.depth() for name, w in _workers().items()}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import torch

        torch.set_num_threads(max(1, int(settings.threads)))
        if not state["backends"]:
            for spec in settings.models:
                backend = await run_in_threadpool(load_backend, spec, settings.device, settings.allow_unverified,
                                                  settings.analog)
                state["backends"][backend.name] = backend
        if not state["backends"]:
            raise RuntimeError("no model to serve")
        for name, backend in state["backends"].items():
            await run_in_threadpool(warmup, backend)
            worker = ModelWorker(backend, settings.queue_size, settings.batch_window_ms, settings.max_batch, metrics)
            worker.start()
            state["workers"][name] = worker
        state["ready"] = True
        try:
            yield
        finally:  # uvicorn has already let in-flight requests finish; drain what is queued
            state["ready"] = False
            for worker in state["workers"].values():
                await run_in_threadpool(worker.stop, settings.timeout_s)
            print(f"casc serve: stopped; {len(state['workers'])} model worker(s) drained", file=sys.stderr,
                  flush=True)

    app = FastAPIOffline(title="CASC spiking detectors", version="1.0",
                         description="Spiking object detectors (CASC conversion) over HTTP: detect, anytime "
                                     "streaming, video, live frames.", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, state

    def begin_shutdown() -> None:
        """Called on SIGTERM, before the listener closes: readiness fails so load balancers stop sending."""
        state["ready"], state["stopping"] = False, True

    app.state.begin_shutdown = begin_shutdown

    generate_openapi = app.openapi

    def openapi() -> dict:  # on first use: the models are loaded by then
        if app.openapi_schema is None:
            generated = generate_openapi()
            levels = [b.levels for b in state["backends"].values()] or [1]
            max_wake = max(settings.wake_limit(n) for n in levels)
            app.openapi_schema = state_bounds(generated, max_wake, settings.max_sleep)
        return app.openapi_schema

    app.openapi = openapi
    origins = [o.lower().rstrip("/") for o in settings.allowed_origins] + own_origins(settings.host, settings.port)
    app.add_middleware(_OriginMiddleware, allowed=origins)
    app.add_middleware(_AdmissionMiddleware, limit=settings.limit_concurrency, metrics=metrics)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    # -- errors: one JSON shape, no exception text --

    @app.exception_handler(ServiceError)
    async def _service_error(request, error: ServiceError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error: RequestValidationError):
        return JSONResponse({"error": "invalid_parameter", "detail": _validation_detail(error)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        code = STATUS_CODES.get(error.status_code, "error")
        return JSONResponse({"error": code, "detail": str(error.detail)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, error: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=(type(error), error, error.__traceback__))
        return JSONResponse({"error": "internal", "detail": "internal error (details are in the server log)"},
                            status_code=500)

    # -- helpers --

    def worker_for(name: str | None) -> ModelWorker:
        workers = _workers()  # still served while stopping: readiness tells load balancers to go elsewhere
        if not workers:
            raise ServiceError(503, "not_ready", "models are loading", {"Retry-After": "1"})
        if name is None:
            return next(iter(workers.values()))
        if name not in workers:
            raise ServiceError(404, "unknown_model", f"unknown model {name!r}; loaded: {', '.join(workers)}")
        return workers[name]

    def reject_unknown(names, allowed: set[str], where: str) -> None:
        unknown = sorted(set(names) - allowed)
        if unknown:
            raise ServiceError(422, "invalid_parameter", f"unknown {where} parameter(s): {', '.join(unknown)}; "
                                                         f"accepted: {', '.join(sorted(allowed))}")

    async def read_body(request: Request, held: list[int], deadline: float) -> bytes:
        """The body, within the size limit and the body deadline; its bytes count against the budget."""
        limit = settings.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    raise ServiceError(413, "upload_too_large",
                                       f"upload of {length} bytes exceeds the limit of {limit} bytes")
            except ValueError:
                raise ServiceError(400, "bad_request", "invalid Content-Length") from None
        chunks, size = [], 0
        body_deadline = time.monotonic() + settings.body_timeout_s
        stream = request.stream().__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), max(0.001, body_deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                size += len(chunk)
                if size > limit:
                    raise ServiceError(413, "upload_too_large", f"upload exceeds the limit of {limit} bytes",
                                       {"Connection": "close"})
                held.append(await budget.reserve(len(chunk), deadline))
                chunks.append(chunk)
        except asyncio.TimeoutError:
            raise ServiceError(408, "body_timeout", f"the request body did not arrive within "
                                                    f"{settings.body_timeout_s} s", {"Connection": "close"}) from None
        except ClientDisconnect:
            raise ServiceError(400, "client_disconnected", "the client went away during the upload") from None
        return b"".join(chunks)

    async def upload(request: Request, raw_types: set[str], what: str, held: list[int], deadline: float,
                     extra_fields: set[str] = frozenset()) -> tuple[bytes, dict]:
        """(bytes, form fields) from a multipart ``file`` field or a raw body."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, held, deadline)
        if content_type == "multipart/form-data":
            held.append(await budget.reserve(len(body), deadline))  # the parsed copy of the file part

            async def parts():
                yield body

            try:
                form = await _PartsInMemory(request.headers, parts(), max_files=2, max_fields=20).parse()
            except MultiPartException:
                raise ServiceError(400, "bad_multipart", "the multipart body is malformed (boundary, headers or "
                                                         "too many parts)") from None
            try:
                file = form.get("file")
                if not isinstance(file, UploadFile):
                    raise ServiceError(422, "missing_file", f"multipart upload needs a `file` field with the {what}")
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                reject_unknown(form.keys(), QUERY_NAMES | set(extra_fields) | {"file"}, "form")
                data = await file.read()
            finally:
                await form.close()
            return data, fields
        if not body and content_type in ("", *raw_types):
            raise ServiceError(400, "empty_body", f"no {what} data received")
        if content_type not in raw_types:
            shown = content_type or "none"
            raise ServiceError(415, "unsupported_media_type",
                               f"content type {shown!r}: send multipart/form-data with a `file` field, or the raw "
                               f"{what} with one of: {', '.join(sorted(raw_types))}")
        return body, {}

    def merge_params(query: dict, fields: dict) -> tuple[ModelWorker, Params]:
        values = dict(query)
        for key in QUERY_NAMES:
            if key in fields and fields[key] != "":
                values[key] = fields[key]
        try:
            p = DetectParams(**values)
        except ValidationError as error:
            raise ServiceError(422, "invalid_parameter", _validation_detail(error)) from None
        worker = worker_for(p.model)
        return worker, p.params(worker.backend, settings)

    def submit(worker: ModelWorker, job: Job) -> None:
        """Queue ``job``; a full queue answers 503 with Retry-After."""
        try:
            worker.submit(job)
        except QueueFull as error:
            metrics.reject(worker.backend.name, "queue_full")
            raise ServiceError(503, "queue_full", str(error), {"Retry-After": "1"}) from None

    async def run_job(worker: ModelWorker, job: Job, deadline: float, request: Request | None = None):
        """The job's result. It is cancelled (the model stops within one time step) on timeout, when the caller
        is cancelled, and, given the ``request`` whose body has been read, when that client goes away."""
        submit(worker, job)
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(until_disconnected(request)) if request is not None else None
        try:
            done, _ = await asyncio.wait({result} | ({gone} if gone else set()),
                                         timeout=max(0.001, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if result in done:
                return result.result()
            job.cancelled.set()
            result.cancel()
            if gone is not None and gone in done:
                metrics.reject(worker.backend.name, "client_gone")
                raise ServiceError(400, "client_disconnected", "the client went away before the result")
            metrics.reject(worker.backend.name, "timeout")
            raise ServiceError(504, "timeout", f"no result within {settings.timeout_s} s")
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        finally:
            if gone is not None:
                gone.cancel()

    async def until_disconnected(request: Request) -> None:
        """Returns when the client of ``request`` (body already read) disconnects: the next ASGI message."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def decoded_job(kind: str, data: bytes, worker: ModelWorker, params: Params, held: list[int],
                          deadline: float, **job_fields) -> Job:
        """Check the header, decode straight to the model's input size (its working memory reserved while it
        runs), and hold only the resized image's bytes until the job ends."""
        backend = worker.backend
        size = await run_in_threadpool(header_size, data, settings.max_pixels)
        check_shape(size, backend, settings.max_pixels, settings.max_aspect)
        working = await budget.reserve(await run_in_threadpool(working_bytes, data, size, backend), deadline)
        try:
            decoded = await run_in_threadpool(decode_for, data, backend, settings.max_pixels)
        finally:
            await budget.release(working)
        held.append(await budget.reserve(decoded.array.nbytes, deadline))
        return Job(kind, decoded.array, params, scale=decoded.scale, size=decoded.size,
                   heavy=params.heavy(backend.levels), **job_fields)

    async def release(held: list[int]) -> None:
        await budget.release(sum(held))
        held.clear()

    def response_of(worker, params, result, decode_ms, job: Job, t0: float) -> dict:
        done = time.perf_counter()
        started = job.started or done
        width, height = job.size or (int(job.image.shape[1]), int(job.image.shape[0]))
        return {"model": worker.backend.name, "image": {"width": width, "height": height},
                **{k: result.get(k) for k in ("steps", "wake", "spikes", "energy_uj", "settled")},
                **({"keyframe": result["keyframe"]} if job.kind == "frame" else {}),
                "detections": scale_detections(result.get("detections") or [], *job.scale),
                "sleep": params.sleep, "burst": params.burst, "max_sleep": params.max_sleep,
                "timings": {"decode_ms": round(decode_ms, 3), "queue_ms": round((started - job.enqueued) * 1000, 3),
                            "inference_ms": round((done - started) * 1000, 3),
                            "total_ms": round((done - t0) * 1000, 3), "batch_size": job.batch_size}}

    async def image_request(request: Request, query: dict, kind: str, held: list[int], deadline: float,
                            **job_fields) -> tuple[ModelWorker, Params, Job, float]:
        reject_unknown(request.query_params.keys(), QUERY_NAMES, "query")
        t0 = time.perf_counter()
        body_held: list[int] = []
        try:
            data, fields = await upload(request, IMAGE_CONTENT_TYPES | {"application/octet-stream"}, "image",
                                        body_held, deadline)
            worker, params = merge_params(query, fields)
            job = await decoded_job(kind, data, worker, params, held, deadline, **job_fields)
        finally:  # the body's bytes: only the resized image stays while queued
            await release(body_held)
        return worker, params, job, (time.perf_counter() - t0) * 1000

    # -- endpoints --

    @app.get("/healthz", response_model=Health, tags=["service"], summary="liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, tags=["service"], summary="readiness: models loaded, not stopping",
             responses={503: {"model": ErrorResponse}})
    async def readyz():
        if state["stopping"]:
            raise ServiceError(503, "stopping", "the service is shutting down", {"Retry-After": "1"})
        if not state["ready"]:
            raise ServiceError(503, "not_ready", "models are loading", {"Retry-After": "1"})
        return {"status": "ready", "models": list(_workers())}

    @app.get("/v1/models", response_model=ModelList, tags=["models"], summary="loaded models (names, sha256)")
    async def models():
        backends = state["backends"]
        default = next(iter(backends))
        return {"default": default, "models": [{**b.describe(), "default": name == default,
                                                "max_wake": settings.wake_limit(b.levels),
                                                "max_sleep": settings.max_sleep}
                                               for name, b in backends.items()]}

    @app.post("/v1/detect", response_model=DetectResponse, tags=["detect"], responses=ERRORS,
              openapi_extra=IMAGE_BODY, summary="detect objects in one image")
    async def detect(request: Request, query: dict = _depends(_detect_query)):
        t0 = time.perf_counter()
        deadline = time.monotonic() + settings.timeout_s
        held: list[int] = []
        try:
            worker, params, job, decode_ms = await image_request(request, query, "predict", held, deadline)
            result = await run_job(worker, job, deadline, request)
        finally:
            await release(held)
        metrics.add_result(worker.backend.name, result.get("spikes"))
        return response_of(worker, params, result, decode_ms, job, t0)

    @app.post("/v1/detect/stream", tags=["detect"], summary="anytime detection, one event per time step",
              description="NDJSON (`application/x-ndjson`): one `step` line per time step with the detections "
                          "decoded from the readouts so far and the running spike count, then a `final` line "
                          "(the same fields as `/v1/detect`). With `Accept: text/event-stream` the same events "
                          "come as server-sent events (`event: step` / `event: final`).",
              responses={**ERRORS, 200: {"description": "event stream", "content": {
                  "application/x-ndjson": {"schema": StreamStep.model_json_schema()},
                  "text/event-stream": {"schema": {"type": "string"}}}}},
              openapi_extra=IMAGE_BODY)
    async def detect_stream(request: Request, query: dict = _depends(_detect_query)):
        t0 = time.perf_counter()
        deadline = time.monotonic() + settings.timeout_s
        sse = "text/event-stream" in request.headers.get("accept", "")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        held: list[int] = []
        emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        try:
            worker, params, job, decode_ms = await image_request(request, query, "stream", held, deadline,
                                                                 emit=emit)
            first = await first_event(worker, job, events, deadline)
        except BaseException:
            await release(held)
            raise

        def encode(event: dict) -> bytes:
            if sse:
                return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            return (json.dumps(event) + "\n").encode()

        async def body():
            event = first
            try:
                while event is not None:
                    if event.get("type") == "final":
                        metrics.add_result(worker.backend.name, event.get("spikes"))
                        event = {"type": "final", **response_of(worker, params, event, decode_ms, job, t0)}
                    else:
                        event = {**event, "detections": scale_detections(event["detections"], *job.scale)}
                    yield encode(event)
                    try:
                        event = await asyncio.wait_for(events.get(), max(0.001, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        metrics.reject(worker.backend.name, "timeout")
                        yield encode({"type": "error", "error": "timeout",
                                      "detail": f"stream not finished within {settings.timeout_s} s"})
                        return
                if job.future.done() and job.future.exception() is not None:
                    error = job.future.exception()
                    reply = error.body() if isinstance(error, ServiceError) else {"error": "internal",
                                                                                 "detail": "internal error"}
                    yield encode({"type": "error", **reply})
            finally:  # client gone, timeout or done: stop the worker's loop
                job.cancelled.set()
                await release(held)

        media = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-cache",
                                                                    "X-Accel-Buffering": "no"})

    async def first_event(worker: ModelWorker, job: Job, events: asyncio.Queue, deadline: float) -> dict:
        """The stream's first event, or a 504 / the model's error before any byte is sent."""
        submit(worker, job)
        try:
            first = await asyncio.wait_for(events.get(), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            job.cancelled.set()
            job.future.cancel()
            metrics.reject(worker.backend.name, "timeout")
            raise ServiceError(504, "timeout", f"no result within {settings.timeout_s} s") from None
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first is None:
            error = job.future.exception() if job.future.done() else None
            raise error if isinstance(error, ServiceError) else ServiceError(500, "internal",
                                                                             "the model produced no event")
        return first

    @app.post("/v1/video", tags=["detect"], summary="detections for every N-th frame of an uploaded video",
              description="NDJSON: one `frame` line per processed frame, then an `end` line. Only MP4/MOV, AVI and "
                          "Matroska/WebM files are accepted (by their signature), decoded by FFmpeg with that "
                          "demuxer and the local file as the only protocol. Limits: --max-video-frames decoded "
                          "frames, --max-video-s duration (from the header).",
              responses={**ERRORS, 200: {"description": "NDJSON", "content": {
                  "application/x-ndjson": {"schema": VideoFrame.model_json_schema()}}}},
              openapi_extra=VIDEO_BODY)
    async def video(request: Request, query: dict = _depends(_detect_query),
                    every: Optional[int] = Query(None, ge=1, le=1000, description="process every N-th frame (1)"),
                    delta: bool = Query(True, description="keep the network's state from frame to frame and feed "
                                        "only each frame's change (exact; a changed frame takes about 2 steps)"),
                    keyframe_every: int = Query(KEYFRAME_EVERY, ge=1, le=1000, description="with delta: run the "
                                                "whole schedule every N processed frames")):
        reject_unknown(request.query_params.keys(), QUERY_NAMES | VIDEO_QUERY_NAMES | {"every"}, "query")
        deadline = time.monotonic() + settings.timeout_s
        held: list[int] = []
        try:
            data, fields = await upload(request, VIDEO_TYPES, "video", held, deadline, {"every"})
            every = _every(fields, every)
            worker, params = merge_params(query, fields)
            video_predictor = worker.backend.video(params, delta, keyframe_every)  # this request's own state
            if not data:
                raise ServiceError(400, "empty_body", "no video data received")
            container = container_of(data)
            on_disk = await disk.reserve(len(data), time.monotonic())  # full: 503 at once, never a full volume
            try:
                path = await run_in_threadpool(save_upload, data, container)
            except BaseException:
                await disk.release(on_disk)
                raise
            del data
        finally:
            await release(held)
        try:
            capture, info = await run_in_threadpool(open_video, path, container, settings)
        except BaseException:
            os.unlink(path)
            await disk.release(on_disk)
            raise
        lines = video_lines(worker, params, capture, info, every, path, on_disk, deadline, video_predictor)
        await lines.__anext__()  # started: its clean-up (capture, temp file, disk budget) runs however it ends
        return StreamingResponse(lines, media_type="application/x-ndjson")

    async def video_lines(worker, params, capture, info, every, path, on_disk, deadline, video_predictor):
        processed, index, truncated = 0, 0, False
        try:
            yield b""  # consumed by video(): a started generator always runs its clean-up
            frame = info.pop("first")
            while frame is not None:
                if index % every == 0:
                    image, scale = fit_frame(frame[..., ::-1], worker.backend)
                    job = Job("frame", image, params, scale=scale, heavy=params.heavy(worker.backend.levels),
                              video=video_predictor)
                    try:
                        result = await _run_patient(worker, job, deadline)
                    except ServiceError as error:
                        yield (json.dumps({"type": "error", **error.body()}) + "\n").encode()
                        return
                    metrics.add_result(worker.backend.name, result.get("spikes"))
                    processed += 1
                    line = {"type": "frame", "frame": index, "time_s": round(index / info["fps"], 4)
                            if info["fps"] > 0 else 0.0,
                            "detections": scale_detections(result.get("detections") or [], *scale),
                            **{k: result.get(k) for k in ("steps", "spikes", "energy_uj", "settled", "keyframe")}}
                    yield (json.dumps(line) + "\n").encode()
                index += 1
                if index >= settings.max_video_frames:
                    truncated = await run_in_threadpool(capture.grab)
                    break
                frame = await run_in_threadpool(read_frame, capture)
            yield (json.dumps({"type": "end", "frames": index, "processed": processed, "every": every,
                               "fps": info["fps"], "width": info["width"], "height": info["height"],
                               "truncated": bool(truncated)}) + "\n").encode()
        finally:
            capture.release()
            with contextlib.suppress(OSError):
                os.unlink(path)
            await disk.release(on_disk)

    async def _run_patient(worker: ModelWorker, job: Job, deadline: float):
        """Video frames wait for room in the queue (the client is a batch upload) until the deadline."""
        while True:
            try:
                return await run_job(worker, job, deadline)
            except ServiceError as error:
                if error.code != "queue_full" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    @app.websocket("/v1/stream")
    async def live(websocket: WebSocket):
        """Live frames: send encoded images as binary messages; each answer is a JSON text message with the
        detections of the newest frame. Frames that arrive while one is being processed replace each other
        (latest wins); ``dropped`` counts the skipped ones. A bad frame gets an error message and the socket
        stays open. Query parameters as for ``/v1/detect``. Closed after --ws-idle-s without a message and
        after --ws-max-s in all; a page of another origin is refused (policy close)."""
        if not origin_allowed(websocket.headers.get("origin"), origins):
            await websocket.close(code=WS_CLOSE_POLICY, reason="origin not allowed")
            return
        await websocket.accept()
        try:
            reject_unknown(websocket.query_params.keys(), QUERY_NAMES | VIDEO_QUERY_NAMES, "query")
            query = dict(websocket.query_params)
            delta, keyframe_every = video_options(query)
            worker, params = merge_params({k: v for k, v in query.items() if k not in VIDEO_QUERY_NAMES}, {})
            video_predictor = worker.backend.video(params, delta, keyframe_every)
        except ServiceError as error:
            await websocket.send_json(error.body())
            await websocket.close(code=WS_CLOSE_POLICY)
            return
        await LiveSession(websocket, worker, params, video_predictor).run()

    class LiveSession:
        """One live WebSocket: a receiver task keeps only the newest frame; the main loop answers it. Frames go
        through the connection's own video predictor (delta frames unless ``delta=false``)."""

        def __init__(self, websocket: WebSocket, worker: ModelWorker, params: Params, video_predictor):
            self.ws, self.worker, self.params, self.video = websocket, worker, params, video_predictor
            self.latest = None
            self.wake_up, self.closed = asyncio.Event(), asyncio.Event()
            self.received = self.dropped = 0
            self.close_reason: str | None = None

        async def receiver(self):
            ends = time.monotonic() + settings.ws_max_s
            try:
                while True:
                    timeout = min(settings.ws_idle_s, ends - time.monotonic())
                    if timeout <= 0:
                        self.close_reason = f"session over {settings.ws_max_s} s"
                        break
                    try:
                        message = await asyncio.wait_for(self.ws.receive(), timeout)
                    except asyncio.TimeoutError:
                        self.close_reason = (f"session over {settings.ws_max_s} s" if time.monotonic() >= ends
                                             else f"idle for {settings.ws_idle_s} s")
                        break
                    if message["type"] == "websocket.disconnect":
                        break
                    await self.take(message)
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                self.closed.set()
                self.wake_up.set()

        async def take(self, message: dict):
            data = message.get("bytes")
            if data is None:
                text = message.get("text") or ""
                await self.ws.send_json({"type": "pong"} if text == "ping" else
                                        {"type": "error", "error": "bad_message",
                                         "detail": "send frames as binary messages (encoded images)"})
                return
            if self.latest is not None:
                self.dropped += 1
                metrics.drop_frames(1)
            self.latest = (self.received, data)
            self.received += 1
            self.wake_up.set()

        async def answer(self, seq: int, data: bytes) -> dict:
            t0 = time.perf_counter()
            deadline = time.monotonic() + settings.timeout_s
            held: list[int] = []
            try:
                if len(data) > settings.max_upload_bytes:
                    raise ServiceError(413, "upload_too_large", "frame exceeds the upload limit")
                held.append(await budget.reserve(len(data), deadline))
                job = await decoded_job("frame", data, self.worker, self.params, held, deadline, video=self.video)
                result = await run_job(self.worker, job, deadline)
                metrics.add_result(self.worker.backend.name, result.get("spikes"))
                return {"type": "detections", "frame": seq, "dropped": self.dropped,
                        **response_of(self.worker, self.params, result, 0.0, job, t0)}
            except ServiceError as error:
                return {"type": "error", "frame": seq, **error.body()}
            except Exception as error:  # noqa: BLE001 - one bad frame never closes the socket
                log.error("live frame failed", exc_info=(type(error), error, error.__traceback__))
                return {"type": "error", "frame": seq, "error": "internal", "detail": "internal error"}
            finally:
                await release(held)

        async def run(self):
            task = asyncio.create_task(self.receiver())
            try:
                while True:
                    await self.wake_up.wait()
                    self.wake_up.clear()
                    if self.closed.is_set():
                        break
                    item, self.latest = self.latest, None
                    if item is not None:
                        answer = asyncio.ensure_future(self.answer(*item))
                        closed = asyncio.ensure_future(self.closed.wait())
                        await asyncio.wait({answer, closed}, return_when=asyncio.FIRST_COMPLETED)
                        closed.cancel()
                        if not answer.done():  # the client left: its frame stops within one time step
                            answer.cancel()
                            break
                        await self.ws.send_json(answer.result())
                if self.close_reason:
                    await self.ws.send_json({"type": "closing", "reason": self.close_reason})
                    await self.ws.close(code=WS_CLOSE_GOING_AWAY, reason=self.close_reason[:100])
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                with contextlib.suppress(BaseException):
                    await self.ws.close()

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"], summary="Prometheus metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/demo-image", include_in_schema=False)
    async def demo_image():
        if not settings.demo_image or not Path(settings.demo_image).is_file():
            raise ServiceError(404, "not_found", "no demo image configured (casc serve --demo-image PATH)")
        return FileResponse(settings.demo_image)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


VIDEO_QUERY_NAMES = {"delta", "keyframe_every"}


def video_options(query: dict) -> tuple[bool, int]:
    """(delta, keyframe_every) of a live stream's query string: ``delta`` true/false (default true),
    ``keyframe_every`` 1..1000 (default KEYFRAME_EVERY)."""
    delta = str(query.get("delta", "true")).lower()
    if delta not in ("true", "false", "1", "0"):
        raise ServiceError(422, "invalid_parameter", "delta: must be true or false")
    try:
        keyframe_every = int(query.get("keyframe_every", KEYFRAME_EVERY))
    except ValueError:
        keyframe_every = 0
    if not 1 <= keyframe_every <= 1000:
        raise ServiceError(422, "invalid_parameter", "keyframe_every: must be an integer 1..1000")
    return delta in ("true", "1"), keyframe_every


def _every(fields: dict, every: int | None) -> int:
    if "every" in fields and fields["every"] != "":
        try:
            every = int(fields["every"])
        except ValueError:
            raise ServiceError(422, "invalid_parameter", "every: must be an integer 1..1000") from None
        if not 1 <= every <= 1000:
            raise ServiceError(422, "invalid_parameter", "every: must be an integer 1..1000")
    return every or 1


def _depends(fn):
    from fastapi import Depends

    return Depends(fn)

"""The FastAPI application: ``create_app(settings, backends=None)``.

Endpoints: ``/healthz``, ``/readyz``, ``/v1/models``, ``/v1/detect``, ``/v1/detect/stream`` (NDJSON or SSE),
``/v1/video`` (NDJSON per frame), ``WS /v1/stream`` (live frames, latest wins), ``/`` (web page), ``/metrics``.
Every error is JSON ``{"error": code, "detail": text}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .backends import Backend, Params, load_backend, warmup
from .config import IMAGE_CONTENT_TYPES, MAX_SLEEP, MAX_WAKE, Settings
from .errors import ServiceError
from .imaging import decode_image, set_pixel_limit
from .metrics import Metrics
from .schemas import (DetectResponse, ErrorResponse, Health, ModelInfo, ModelList, Ready, StreamStep,
                      VideoFrame)
from .worker import Job, ModelWorker, QueueFull

STATIC = Path(__file__).resolve().parent / "static"
SLEEP_PATTERN = r"^(auto|[0-9]{1,3})$"
KNOWN_PATHS = {"/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/detect", "/v1/detect/stream",
               "/v1/video", "/v1/stream", "/demo-image", "/openapi.json", "/docs"}
STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
                413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter",
                429: "too_many_requests", 503: "unavailable", 504: "timeout"}


class DetectParams(BaseModel):
    """Query or form parameters shared by the detection endpoints (validated in one place)."""

    model: Optional[str] = Field(None, max_length=200)
    wake: Optional[int] = Field(None, ge=1, le=MAX_WAKE)
    sleep: Optional[str] = Field(None, pattern=SLEEP_PATTERN)
    conf: float = Field(0.25, ge=0.0, le=1.0)
    iou: float = Field(0.7, ge=0.0, le=1.0)
    max_det: int = Field(300, ge=1, le=1000)

    def params(self) -> Params:
        sleep: int | str = "auto" if self.sleep in (None, "auto") else int(self.sleep)
        if isinstance(sleep, int) and sleep > MAX_SLEEP:
            raise ServiceError(422, "invalid_parameter", f"sleep must be 'auto' or an integer 0..{MAX_SLEEP}")
        return Params(wake=self.wake, sleep=sleep, conf=float(self.conf), iou=float(self.iou), max_det=self.max_det)


def _validation_detail(error: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in error.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{loc or 'request'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _detect_query(model: Optional[str] = Query(None, description="model name (GET /v1/models); default: the "
                                               "first loaded", max_length=200),
                  wake: Optional[int] = Query(None, ge=1, le=MAX_WAKE, description="wake steps (default: levels)"),
                  sleep: Optional[str] = Query(None, pattern=SLEEP_PATTERN,
                                               description=f"sleep steps 0..{MAX_SLEEP} or 'auto' (default)"),
                  conf: Optional[float] = Query(None, ge=0.0, le=1.0, description="score threshold (0.25)"),
                  iou: Optional[float] = Query(None, ge=0.0, le=1.0, description="NMS IoU (0.7)"),
                  max_det: Optional[int] = Query(None, ge=1, le=1000, description="max detections (300)")) -> dict:
    values = {"model": model, "wake": wake, "sleep": sleep, "conf": conf, "iou": iou, "max_det": max_det}
    return {k: v for k, v in values.items() if v is not None}


def _request_body(description: str, media: dict[str, dict], extra_fields: dict | None = None) -> dict:
    form_props = {"file": {"type": "string", "format": "binary"},
                  "model": {"type": "string"}, "wake": {"type": "integer", "minimum": 1, "maximum": MAX_WAKE},
                  "sleep": {"type": "string", "pattern": SLEEP_PATTERN},
                  "conf": {"type": "number", "minimum": 0, "maximum": 1},
                  "iou": {"type": "number", "minimum": 0, "maximum": 1},
                  "max_det": {"type": "integer", "minimum": 1, "maximum": 1000}, **(extra_fields or {})}
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": form_props, "required": ["file"]}}}
    content.update({m: {"schema": {"type": "string", "format": "binary"}} for m in media})
    return {"requestBody": {"required": True, "description": description, "content": content}}


IMAGE_BODY = _request_body("the image: multipart field `file`, or the raw bytes with an image content type",
                           {"image/jpeg": {}, "image/png": {}, "image/webp": {}, "image/bmp": {}})
VIDEO_BODY = _request_body("the video: multipart field `file`, or the raw bytes (video/*, application/octet-stream)",
                           {"video/mp4": {}, "video/x-msvideo": {}, "application/octet-stream": {}},
                           {"every": {"type": "integer", "minimum": 1, "maximum": 1000}})
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503, 504)}


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
            endpoint = path if path in KNOWN_PATHS else ("/static" if path.startswith("/static/") else "other")
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status["code"],
                                         time.perf_counter() - start)


def create_app(settings: Settings | None = None, backends: dict[str, Backend] | None = None) -> FastAPI:
    settings = settings or Settings()
    set_pixel_limit(settings.max_pixels)
    metrics = Metrics()
    state: dict = {"backends": dict(backends or {}), "workers": {}, "ready": False}

    def _workers() -> dict[str, ModelWorker]:
        return state["workers"]

    metrics.queue_depth = lambda: {name: w.depth() for name, w in _workers().items()}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        torch.set_num_threads(max(1, int(settings.threads)))
        if not state["backends"]:
            for spec in settings.models:
                backend = await run_in_threadpool(load_backend, spec, settings.device)
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

    app = FastAPI(title="CASC spiking detectors", version="1.0",
                  description="Spiking object detectors (CASC conversion) over HTTP: detect, anytime streaming, "
                              "video, live frames.", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, state
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    # -- errors: one JSON shape --

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
        return JSONResponse({"error": "internal", "detail": f"{type(error).__name__}: {error}"}, status_code=500)

    # -- helpers --

    def worker_for(name: str | None) -> ModelWorker:
        if not state["ready"]:
            raise ServiceError(503, "not_ready", "models are loading", {"Retry-After": "1"})
        workers = _workers()
        if name is None:
            return next(iter(workers.values()))
        if name not in workers:
            raise ServiceError(404, "unknown_model", f"unknown model {name!r}; loaded: {', '.join(workers)}")
        return workers[name]

    async def read_body(request: Request) -> bytes:
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
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ServiceError(413, "upload_too_large", f"upload exceeds the limit of {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ServiceError(400, "client_disconnected", "the client went away during the upload") from None
        return b"".join(chunks)

    async def upload(request: Request, raw_types: set[str], what: str) -> tuple[bytes, dict, str | None]:
        """(bytes, form fields, filename) from a multipart ``file`` field or a raw body."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request)
        if content_type == "multipart/form-data":
            request._body = body  # the parser reads the (already size-checked) body
            form = await request.form(max_files=2, max_fields=20)
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise ServiceError(422, "missing_file", f"multipart upload needs a `file` field with the {what}")
            data = await file.read()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            return data, fields, file.filename
        if not body and content_type in ("", *raw_types):
            raise ServiceError(400, "empty_body", f"no {what} data received")
        if content_type not in raw_types:
            shown = content_type or "none"
            raise ServiceError(415, "unsupported_media_type",
                               f"content type {shown!r}: send multipart/form-data with a `file` field, or the raw "
                               f"{what} with one of: {', '.join(sorted(raw_types))}")
        return body, {}, None

    def merge_params(query: dict, fields: dict) -> tuple[DetectParams, Params]:
        values = dict(query)
        for key in DetectParams.model_fields:
            if key in fields and fields[key] != "":
                values[key] = fields[key]
        try:
            p = DetectParams(**values)
        except ValidationError as error:
            raise ServiceError(422, "invalid_parameter", _validation_detail(error)) from None
        return p, p.params()

    async def run_job(worker: ModelWorker, job: Job, deadline: float):
        try:
            worker.submit(job)
        except QueueFull as error:
            metrics.reject(worker.backend.name, "queue_full")
            raise ServiceError(503, "queue_full", str(error), {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            job.cancelled.set()
            metrics.reject(worker.backend.name, "timeout")
            raise ServiceError(504, "timeout", f"no result within {settings.timeout_s} s") from None
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def prepare(request: Request, query: dict):
        t0 = time.perf_counter()
        data, fields, _ = await upload(request, IMAGE_CONTENT_TYPES | {"application/octet-stream"}, "image")
        p, params = merge_params(query, fields)
        worker = worker_for(p.model)
        image = await run_in_threadpool(decode_image, data, settings.max_pixels)
        return worker, params, image, (time.perf_counter() - t0) * 1000

    def response_of(worker, params, image, result, decode_ms, job: Job, t0: float) -> dict:
        done = time.perf_counter()
        started = job.started or done
        return {"model": worker.backend.name, "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
                **{k: result.get(k) for k in ("detections", "steps", "wake", "spikes", "energy_uj", "settled")},
                "sleep": params.sleep,
                "timings": {"decode_ms": round(decode_ms, 3), "queue_ms": round((started - job.enqueued) * 1000, 3),
                            "inference_ms": round((done - started) * 1000, 3),
                            "total_ms": round((done - t0) * 1000, 3), "batch_size": job.batch_size}}

    # -- endpoints --

    @app.get("/healthz", response_model=Health, tags=["service"], summary="liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, tags=["service"], summary="readiness: models loaded",
             responses={503: {"model": ErrorResponse}})
    async def readyz():
        if not state["ready"]:
            raise ServiceError(503, "not_ready", "models are loading or the service is stopping", {"Retry-After": "1"})
        return {"status": "ready", "models": list(_workers())}

    @app.get("/v1/models", response_model=ModelList, tags=["models"], summary="loaded models")
    async def models():
        backends = state["backends"]
        default = next(iter(backends))
        return {"default": default, "models": [{**b.describe(), "default": name == default}
                                               for name, b in backends.items()]}

    @app.post("/v1/detect", response_model=DetectResponse, tags=["detect"], responses=ERRORS,
              openapi_extra=IMAGE_BODY, summary="detect objects in one image")
    async def detect(request: Request, query: dict = _depends(_detect_query)):
        t0 = time.perf_counter()
        deadline = time.monotonic() + settings.timeout_s
        worker, params, image, decode_ms = await prepare(request, query)
        job = Job("predict", image, params)
        result = await run_job(worker, job, deadline)
        metrics.add_result(worker.backend.name, result.get("spikes"))
        return response_of(worker, params, image, result, decode_ms, job, t0)

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
        worker, params, image, decode_ms = await prepare(request, query)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job("stream", image, params, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            worker.submit(job)
        except QueueFull as error:
            metrics.reject(worker.backend.name, "queue_full")
            raise ServiceError(503, "queue_full", str(error), {"Retry-After": "1"}) from None
        try:  # the first event, or a 504 before any byte is sent
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
            raise error or ServiceError(500, "internal", "the model produced no event")

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
                        event = {"type": "final", **response_of(worker, params, image, event, decode_ms, job, t0)}
                    yield encode(event)
                    remaining = deadline - time.monotonic()
                    try:
                        event = await asyncio.wait_for(events.get(), max(0.001, remaining))
                    except asyncio.TimeoutError:
                        metrics.reject(worker.backend.name, "timeout")
                        yield encode({"type": "error", "error": "timeout",
                                      "detail": f"stream not finished within {settings.timeout_s} s"})
                        return
                if job.future.done() and job.future.exception() is not None:
                    error = job.future.exception()
                    yield encode({"type": "error", "error": "internal", "detail": f"{type(error).__name__}: {error}"})
            finally:  # client gone, timeout or done: stop the worker's loop
                job.cancelled.set()

        media = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-cache",
                                                                    "X-Accel-Buffering": "no"})

    @app.post("/v1/video", tags=["detect"], summary="detections for every N-th frame of an uploaded video",
              description="NDJSON: one `frame` line per processed frame, then an `end` line. Decoded with OpenCV. "
                          "Limits: --max-video-frames decoded frames, --max-video-s duration (from the header).",
              responses={**ERRORS, 200: {"description": "NDJSON", "content": {
                  "application/x-ndjson": {"schema": VideoFrame.model_json_schema()}}}},
              openapi_extra=VIDEO_BODY)
    async def video(request: Request, query: dict = _depends(_detect_query),
                    every: Optional[int] = Query(None, ge=1, le=1000, description="process every N-th frame (1)")):
        deadline = time.monotonic() + settings.timeout_s
        raw = {"application/octet-stream", "video/mp4", "video/x-msvideo", "video/avi", "video/quicktime",
               "video/webm", "video/x-matroska", "video/mpeg"}
        data, fields, filename = await upload(request, raw, "video")
        if "every" in fields and fields["every"] != "":
            try:
                every = int(fields["every"])
            except ValueError:
                raise ServiceError(422, "invalid_parameter", "every: must be an integer 1..1000") from None
            if not 1 <= every <= 1000:
                raise ServiceError(422, "invalid_parameter", "every: must be an integer 1..1000")
        every = every or 1
        p, params = merge_params(query, fields)
        worker = worker_for(p.model)
        if not data:
            raise ServiceError(400, "empty_body", "no video data received")
        suffix = Path(filename or "").suffix.lower()
        suffix = suffix if suffix.isascii() and 1 < len(suffix) <= 6 and suffix[1:].isalnum() else ".bin"
        tmp = tempfile.NamedTemporaryFile(prefix="casc-video-", suffix=suffix, delete=False)
        try:
            tmp.write(data)
            tmp.close()
            capture, info = await run_in_threadpool(_open_video, tmp.name, settings)
        except BaseException:
            os.unlink(tmp.name)
            raise

        async def body():
            processed, index, truncated = 0, 0, False
            try:
                frame = info.pop("first")
                while frame is not None:
                    if index % every == 0:
                        rgb = np.ascontiguousarray(frame[..., ::-1])
                        job = Job("predict", rgb, params)
                        try:
                            result = await _run_patient(worker, job, deadline)
                        except ServiceError as error:
                            yield (json.dumps({"type": "error", **error.body()}) + "\n").encode()
                            return
                        metrics.add_result(worker.backend.name, result.get("spikes"))
                        processed += 1
                        line = {"type": "frame", "frame": index, "time_s": round(index / info["fps"], 4)
                                if info["fps"] > 0 else 0.0,
                                **{k: result.get(k) for k in ("detections", "steps", "spikes", "energy_uj")}}
                        yield (json.dumps(line) + "\n").encode()
                    index += 1
                    if index >= settings.max_video_frames:
                        truncated = await run_in_threadpool(lambda: capture.grab())
                        break
                    frame = await run_in_threadpool(_read_frame, capture)
                yield (json.dumps({"type": "end", "frames": index, "processed": processed, "every": every,
                                   "fps": info["fps"], "width": info["width"], "height": info["height"],
                                   "truncated": bool(truncated)}) + "\n").encode()
            finally:
                capture.release()
                with contextlib.suppress(OSError):
                    os.unlink(tmp.name)

        return StreamingResponse(body(), media_type="application/x-ndjson")

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
        (latest wins); ``dropped`` counts the skipped ones. Query parameters as for ``/v1/detect``."""
        await websocket.accept()
        query = {k: v for k, v in websocket.query_params.items() if k in DetectParams.model_fields}
        try:
            p, params = merge_params({}, query)
            worker = worker_for(p.model)
        except ServiceError as error:
            await websocket.send_json(error.body())
            await websocket.close(code=1008)
            return
        latest: dict = {"frame": None}
        wake_up = asyncio.Event()
        closed = asyncio.Event()
        counters = {"received": 0, "dropped": 0}

        async def receiver():
            try:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    data = message.get("bytes")
                    if data is None:
                        text = message.get("text") or ""
                        await websocket.send_json({"error": "bad_message",
                                                   "detail": "send frames as binary messages (encoded images)"}
                                                  if text != "ping" else {"type": "pong"})
                        continue
                    if latest["frame"] is not None:
                        counters["dropped"] += 1
                        metrics.drop_frames(1)
                    latest["frame"] = (counters["received"], data)
                    counters["received"] += 1
                    wake_up.set()
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                closed.set()
                wake_up.set()

        task = asyncio.create_task(receiver())
        try:
            while True:
                await wake_up.wait()
                wake_up.clear()
                if closed.is_set():
                    break
                item, latest["frame"] = latest["frame"], None
                if item is None:
                    continue
                seq, data = item
                t0 = time.perf_counter()
                try:
                    if len(data) > settings.max_upload_bytes:
                        raise ServiceError(413, "upload_too_large", "frame exceeds the upload limit")
                    image = await run_in_threadpool(decode_image, data, settings.max_pixels)
                    job = Job("predict", image, params)
                    result = await run_job(worker, job, time.monotonic() + settings.timeout_s)
                    metrics.add_result(worker.backend.name, result.get("spikes"))
                    answer = {"type": "detections", "frame": seq, "dropped": counters["dropped"],
                              **response_of(worker, params, image, result, 0.0, job, t0)}
                except ServiceError as error:
                    answer = {"type": "error", "frame": seq, **error.body()}
                await websocket.send_json(answer)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(BaseException):
                await websocket.close()

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


def _depends(fn):
    from fastapi import Depends

    return Depends(fn)


def _read_frame(capture):
    ok, frame = capture.read()
    return frame if ok and frame is not None and frame.ndim == 3 else None


def _open_video(path: str, settings: Settings):
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise ServiceError(422, "bad_video", "cannot open the video (corrupt or unsupported container/codec)")
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        count = float(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        fps = fps if math.isfinite(fps) and 0 < fps < 1000 else 0.0
        if fps > 0 and math.isfinite(count) and count / fps > settings.max_video_s:
            raise ServiceError(413, "video_too_long",
                               f"video lasts {count / fps:.1f} s; the limit is {settings.max_video_s} s")
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > settings.max_pixels:
            raise ServiceError(413, "image_too_large", f"video frames are {width}x{height}; over the pixel limit")
        first = _read_frame(capture)
        if first is None:
            raise ServiceError(422, "bad_video", "the video has no decodable frame")
        if first.shape[0] * first.shape[1] > settings.max_pixels:
            raise ServiceError(413, "image_too_large", "video frames are over the pixel limit")
    except BaseException:
        capture.release()
        raise
    return capture, {"fps": fps, "width": int(first.shape[1]), "height": int(first.shape[0]), "first": first}

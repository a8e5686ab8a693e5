"""From a request to a model worker's job and back: the parameters and the worker asked for, decoding within the
byte budget, queueing (503 when full), waiting with the deadline and the client (cancelled work stops within one
time step), and the JSON reply of a result."""

from __future__ import annotations

import asyncio
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .backends import Params, scale_detections
from .config import IMAGE_CONTENT_TYPES
from .errors import ServiceError
from .imaging import check_shape, decode_for, header_size, working_bytes
from .params import QUERY_NAMES, request_values, to_params
from .state import AppState
from .uploads import reject_unknown, upload
from .worker import Job, ModelWorker, QueueFull


def params_for(state: AppState, query: dict, fields: dict) -> tuple[ModelWorker, Params]:
    """The worker of the model asked for and the request's ``Params`` (query, then form fields)."""
    request = request_values(query, fields)
    worker = state.worker_for(request.model)
    return worker, to_params(request, worker.backend, state.settings)


def submit(state: AppState, worker: ModelWorker, job: Job) -> None:
    """Queue ``job``; a full queue answers 503 with Retry-After."""
    try:
        worker.submit(job)
    except QueueFull as error:
        state.metrics.reject(worker.backend.name, "queue_full")
        raise ServiceError(503, "queue_full", str(error), {"Retry-After": "1"}) from None


async def until_disconnected(request: Request) -> None:
    """Returns when the client of ``request`` (body already read) disconnects: the next ASGI message."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_job(state: AppState, worker: ModelWorker, job: Job, deadline: float, request: Request | None = None):
    """The job's result. It is cancelled (the model stops within one time step) on timeout, when the caller
    is cancelled, and, given the ``request`` whose body has been read, when that client goes away."""
    submit(state, worker, job)
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
            state.metrics.reject(worker.backend.name, "client_gone")
            raise ServiceError(400, "client_disconnected", "the client went away before the result")
        state.metrics.reject(worker.backend.name, "timeout")
        raise ServiceError(504, "timeout", f"no result within {state.settings.timeout_s} s")
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    finally:
        if gone is not None:
            gone.cancel()


async def run_patient(state: AppState, worker: ModelWorker, job: Job, deadline: float):
    """Video frames wait for room in the queue (the client is a batch upload) until the deadline."""
    while True:
        try:
            return await run_job(state, worker, job, deadline)
        except ServiceError as error:
            if error.code != "queue_full" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def decoded_job(state: AppState, kind: str, data: bytes, worker: ModelWorker, params: Params,
                      held: list[int], deadline: float, **job_fields) -> Job:
    """Check the header, decode straight to the model's input size (its working memory reserved while it
    runs), and hold only the resized image's bytes and its part of the model's inference memory until the job
    ends."""
    settings, budget, backend = state.settings, state.budget, worker.backend
    size = await run_in_threadpool(header_size, data, settings.max_pixels)
    check_shape(size, backend, settings.max_pixels, settings.max_aspect)
    per_image = state.budgeted(backend.name).per_image
    working = await run_in_threadpool(working_bytes, data, size, backend)
    held.append(await budget.reserve(working + per_image, deadline))  # one wait in line for the whole job
    decoded = await run_in_threadpool(decode_for, data, backend, settings.max_pixels)
    reserved = held.pop()
    kept = min(reserved, decoded.array.nbytes + per_image)  # working_bytes counts the decoded array
    await budget.release(reserved - kept)
    held.append(kept)
    return Job(kind, decoded.array, params, scale=decoded.scale, size=decoded.size,
               heavy=params.heavy(backend.levels), **job_fields)


async def image_request(state: AppState, request: Request, query: dict, kind: str, held: list[int],
                        deadline: float, **job_fields) -> tuple[ModelWorker, Params, Job, float]:
    """An image upload as a decoded job (not queued yet), and the ms its reading and decoding took."""
    reject_unknown(request.query_params.keys(), QUERY_NAMES, "query")
    t0 = time.perf_counter()
    body_held: list[int] = []
    try:
        data, fields = await upload(state, request, IMAGE_CONTENT_TYPES | {"application/octet-stream"}, "image",
                                    body_held, deadline)
        worker, params = params_for(state, query, fields)
        job = await decoded_job(state, kind, data, worker, params, held, deadline, **job_fields)
    finally:  # the body's bytes: only the resized image stays while queued
        await state.budget.release_all(body_held)
    return worker, params, job, (time.perf_counter() - t0) * 1000


def response_of(worker: ModelWorker, params: Params, result: dict, decode_ms: float, job: Job, t0: float) -> dict:
    """The JSON reply of one image's ``result`` (``/v1/detect``, a stream's ``final`` event, a live frame)."""
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

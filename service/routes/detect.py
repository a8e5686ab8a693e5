"""``POST /v1/detect`` (one image, one JSON reply) and ``POST /v1/detect/stream`` (anytime detection: an NDJSON
line or SSE event per time step, then the final reply)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..backends import scale_detections
from ..errors import ServiceError
from ..jobs import image_request, response_of, run_job, submit
from ..openapi import ERRORS, IMAGE_BODY
from ..params import detect_query
from ..schemas import DetectResponse, StreamStep
from ..state import AppState, state_of
from ..worker import Job, ModelWorker

router = APIRouter(tags=["detect"])
STREAM_DESCRIPTION = ("NDJSON (`application/x-ndjson`): one `step` line per time step with the detections decoded "
                      "from the readouts so far and the running spike count, then a `final` line (the same fields "
                      "as `/v1/detect`). With `Accept: text/event-stream` the same events come as server-sent "
                      "events (`event: step` / `event: final`).")
STREAM_RESPONSES = {**ERRORS, 200: {"description": "event stream", "content": {
    "application/x-ndjson": {"schema": StreamStep.model_json_schema()},
    "text/event-stream": {"schema": {"type": "string"}}}}}


@router.post("/v1/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=IMAGE_BODY,
             summary="detect objects in one image")
async def detect(request: Request, query: dict = Depends(detect_query), state: AppState = Depends(state_of)):
    t0 = time.perf_counter()
    deadline = time.monotonic() + state.settings.timeout_s
    held: list[int] = []
    try:
        worker, params, job, decode_ms = await image_request(state, request, query, "predict", held, deadline)
        result = await run_job(state, worker, job, deadline, request)
    finally:
        await state.budget.release_all(held)
    state.metrics.add_result(worker.backend.name, result.get("spikes"))
    return response_of(worker, params, result, decode_ms, job, t0)


@router.post("/v1/detect/stream", summary="anytime detection, one event per time step",
             description=STREAM_DESCRIPTION, responses=STREAM_RESPONSES, openapi_extra=IMAGE_BODY)
async def detect_stream(request: Request, query: dict = Depends(detect_query), state: AppState = Depends(state_of)):
    t0 = time.perf_counter()
    deadline = time.monotonic() + state.settings.timeout_s
    sse = "text/event-stream" in request.headers.get("accept", "")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    held: list[int] = []
    emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
    try:
        worker, params, job, decode_ms = await image_request(state, request, query, "stream", held, deadline,
                                                             emit=emit)
        first = await first_event(state, worker, job, events, deadline)
    except BaseException:
        await state.budget.release_all(held)
        raise
    reply = lambda event: {"type": "final", **response_of(worker, params, event, decode_ms, job, t0)}  # noqa: E731
    body = stream_body(state, StreamRun(worker, job, events, deadline, held, reply, sse), first)
    media = "text/event-stream" if sse else "application/x-ndjson"
    return StreamingResponse(body, media_type=media, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def first_event(state: AppState, worker: ModelWorker, job: Job, events: asyncio.Queue, deadline: float) -> dict:
    """The stream's first event, or a 504 / the model's error before any byte is sent."""
    submit(state, worker, job)
    try:
        first = await asyncio.wait_for(events.get(), max(0.001, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        job.cancelled.set()
        job.future.cancel()
        state.metrics.reject(worker.backend.name, "timeout")
        raise ServiceError(504, "timeout", f"no result within {state.settings.timeout_s} s") from None
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    if first is None:
        error = job.future.exception() if job.future.done() else None
        raise error if isinstance(error, ServiceError) else ServiceError(500, "internal", "the model produced no event")
    return first


def encode(event: dict, sse: bool) -> bytes:
    """One event as an SSE event or an NDJSON line."""
    if sse:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
    return (json.dumps(event) + "\n").encode()


@dataclass
class StreamRun:
    """One image being streamed: its worker and job, the queue of its events, the deadline, the bytes it holds,
    how its ``final`` event becomes the reply (``reply``), and whether the events go out as SSE."""

    worker: ModelWorker
    job: Job
    events: asyncio.Queue
    deadline: float
    held: list[int]
    reply: Callable[[dict], dict]
    sse: bool


async def stream_body(state: AppState, run: StreamRun, event: dict):
    """The stream's bytes from its first ``event`` on: steps with boxes in the image's pixels, the ``final`` event
    as ``run.reply`` makes it, an error event on timeout or failure; the worker stops however it ends."""
    name, job = run.worker.backend.name, run.job
    try:
        while event is not None:
            if event.get("type") == "final":
                state.metrics.add_result(name, event.get("spikes"))
                event = run.reply(event)
            else:
                event = {**event, "detections": scale_detections(event["detections"], *job.scale)}
            yield encode(event, run.sse)
            try:
                event = await asyncio.wait_for(run.events.get(), max(0.001, run.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                state.metrics.reject(name, "timeout")
                yield encode({"type": "error", "error": "timeout",
                              "detail": f"stream not finished within {state.settings.timeout_s} s"}, run.sse)
                return
        if job.future.done() and job.future.exception() is not None:
            error = job.future.exception()
            body = error.body() if isinstance(error, ServiceError) else {"error": "internal", "detail": "internal error"}
            yield encode({"type": "error", **body}, run.sse)
    finally:  # client gone, timeout or done: stop the worker's loop
        job.cancelled.set()
        await state.budget.release_all(run.held)

"""``POST /v1/video``: an uploaded video's every N-th frame through the model (delta frames by default), one
NDJSON line per processed frame, then an ``end`` line."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from detector.detect import KEYFRAME_EVERY

from ..backends import Params, scale_detections
from ..config import MAX_FRAME_STRIDE
from ..errors import ServiceError
from ..imaging import fit_frame
from ..jobs import params_for, run_patient
from ..openapi import ERRORS, VIDEO_BODY
from ..params import QUERY_NAMES, detect_query
from ..schemas import VideoFrame
from ..state import AppState, state_of
from ..uploads import reject_unknown, upload
from ..video import container_of, open_video, read_frame, save_upload
from ..worker import Job, ModelWorker

router = APIRouter(tags=["detect"])
VIDEO_TYPES = {"application/octet-stream", "video/mp4", "video/x-msvideo", "video/avi", "video/quicktime",
               "video/webm", "video/x-matroska"}
VIDEO_QUERY_NAMES = {"delta", "keyframe_every"}
DESCRIPTION = ("NDJSON: one `frame` line per processed frame, then an `end` line. Only MP4/MOV, AVI and "
               "Matroska/WebM files are accepted (by their signature), decoded by FFmpeg with that demuxer and the "
               "local file as the only protocol. Limits: --max-video-frames decoded frames, --max-video-s duration "
               "(from the header).")
RESPONSES = {**ERRORS, 200: {"description": "NDJSON", "content": {
    "application/x-ndjson": {"schema": VideoFrame.model_json_schema()}}}}


@dataclass
class VideoRun:
    """One uploaded video being answered: its worker and params, the open capture and its header ``info``, every
    how many frames, the temp file and its bytes on the disk budget, the deadline, the request's own predictor."""

    worker: ModelWorker
    params: Params
    capture: Any
    info: dict
    every: int
    path: str
    on_disk: int
    deadline: float
    predictor: Any


@router.post("/v1/video", summary="detections for every N-th frame of an uploaded video", description=DESCRIPTION,
             responses=RESPONSES, openapi_extra=VIDEO_BODY)
async def video(request: Request, query: dict = Depends(detect_query), state: AppState = Depends(state_of),
                every: Optional[int] = Query(None, ge=1, le=MAX_FRAME_STRIDE, description="process every N-th frame (1)"),
                delta: bool = Query(True, description="keep the network's state from frame to frame and feed "
                                    "only each frame's change (exact; a changed frame takes about 2 steps)"),
                keyframe_every: int = Query(KEYFRAME_EVERY, ge=1, le=MAX_FRAME_STRIDE, description="with delta: run the "
                                            "whole schedule every N processed frames")):
    reject_unknown(request.query_params.keys(), QUERY_NAMES | VIDEO_QUERY_NAMES | {"every"}, "query")
    deadline = time.monotonic() + state.settings.timeout_s
    held: list[int] = []
    try:
        data, fields = await upload(state, request, VIDEO_TYPES, "video", held, deadline, {"every"})
        every = every_of(fields, every)
        worker, params = params_for(state, query, fields)
        predictor = worker.backend.video(params, delta, keyframe_every)  # this request's own state
        if not data:
            raise ServiceError(400, "empty_body", "no video data received")
        container = container_of(data)
        on_disk = await state.disk.reserve(len(data), time.monotonic())  # full: 503 at once, never a full volume
        try:
            path = await run_in_threadpool(save_upload, data, container)
        except BaseException:
            await state.disk.release(on_disk)
            raise
        del data
    finally:
        await state.budget.release_all(held)
    try:
        capture, info = await run_in_threadpool(open_video, path, container, state.settings)
    except BaseException:
        os.unlink(path)
        await state.disk.release(on_disk)
        raise
    lines = video_lines(state, VideoRun(worker, params, capture, info, every, path, on_disk, deadline, predictor))
    await lines.__anext__()  # started: its clean-up (capture, temp file, disk budget) runs however it ends
    return StreamingResponse(lines, media_type="application/x-ndjson")


async def video_lines(state: AppState, run: VideoRun):
    """The NDJSON lines of ``run``: a first empty chunk, one ``frame`` line per processed frame, an ``end`` line
    (an ``error`` line instead when a frame fails); the capture, temp file and disk budget are freed however it
    ends."""
    processed, index, truncated, info = 0, 0, False, run.info
    try:
        yield b""  # consumed by video(): a started generator always runs its clean-up
        frame = info.pop("first")
        while frame is not None:
            if index % run.every == 0:
                try:
                    yield (json.dumps(await frame_line(state, run, frame, index)) + "\n").encode()
                except ServiceError as error:
                    yield (json.dumps({"type": "error", **error.body()}) + "\n").encode()
                    return
                processed += 1
            index += 1
            if index >= state.settings.max_video_frames:
                truncated = await run_in_threadpool(run.capture.grab)
                break
            frame = await run_in_threadpool(read_frame, run.capture)
        yield (json.dumps({"type": "end", "frames": index, "processed": processed, "every": run.every,
                           "fps": info["fps"], "width": info["width"], "height": info["height"],
                           "truncated": bool(truncated)}) + "\n").encode()
    finally:
        run.capture.release()
        with contextlib.suppress(OSError):
            os.unlink(run.path)
        await state.disk.release(run.on_disk)


async def frame_line(state: AppState, run: VideoRun, frame, index: int) -> dict:
    """One processed frame's ``frame`` line; the resized frame and its part of the model's inference memory are
    held in the byte budget while it runs."""
    backend = run.worker.backend
    image, scale = fit_frame(frame[..., ::-1], backend)
    job = Job("frame", image, run.params, scale=scale, heavy=run.params.heavy(backend.levels), video=run.predictor)
    held = [await state.budget.reserve(image.nbytes + state.budgeted(backend.name).per_image, run.deadline)]
    try:
        result = await run_patient(state, run.worker, job, run.deadline)
    finally:
        await state.budget.release_all(held)
    state.metrics.add_result(backend.name, result.get("spikes"))
    fps = run.info["fps"]
    return {"type": "frame", "frame": index, "time_s": round(index / fps, 4) if fps > 0 else 0.0,
            "detections": scale_detections(result.get("detections") or [], *scale),
            **{k: result.get(k) for k in ("steps", "spikes", "energy_uj", "settled", "keyframe")}}


def every_of(fields: dict, every: int | None) -> int:
    """``every`` from the form (it wins over the query's), 1..MAX_FRAME_STRIDE; default 1."""
    if "every" in fields and fields["every"] != "":
        bad = ServiceError(422, "invalid_parameter", f"every: must be an integer 1..{MAX_FRAME_STRIDE}")
        try:
            every = int(fields["every"])
        except ValueError:
            raise bad from None
        if not 1 <= every <= MAX_FRAME_STRIDE:
            raise bad
    return every or 1

"""``WS /v1/stream``: live frames, latest wins. A ``LiveSession`` per connection: a receiver task keeps only the
newest frame, the main loop answers it through the connection's own video predictor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from detector.detect import KEYFRAME_EVERY

from ..backends import Params
from ..errors import ServiceError
from ..jobs import decoded_job, params_for, response_of, run_job
from ..middleware import origin_allowed
from ..params import QUERY_NAMES
from ..state import AppState, state_of
from ..uploads import reject_unknown
from ..worker import ModelWorker
from .video import VIDEO_QUERY_NAMES

log = logging.getLogger("casc.service")
router = APIRouter()
WS_CLOSE_POLICY, WS_CLOSE_GOING_AWAY = 1008, 1001


@router.websocket("/v1/stream")
async def live(websocket: WebSocket):
    """Live frames: send encoded images as binary messages; each answer is a JSON text message with the
    detections of the newest frame. Frames that arrive while one is being processed replace each other
    (latest wins); ``dropped`` counts the skipped ones. A bad frame gets an error message and the socket
    stays open. Query parameters as for ``/v1/detect``. Closed after --ws-idle-s without a message and
    after --ws-max-s in all; a page of another origin is refused (policy close)."""
    state = state_of(websocket)
    if not origin_allowed(websocket.headers.get("origin"), state.origins):
        await websocket.close(code=WS_CLOSE_POLICY, reason="origin not allowed")
        return
    await websocket.accept()
    try:
        reject_unknown(websocket.query_params.keys(), QUERY_NAMES | VIDEO_QUERY_NAMES, "query")
        query = dict(websocket.query_params)
        delta, keyframe_every = video_options(query)
        worker, params = params_for(state, {k: v for k, v in query.items() if k not in VIDEO_QUERY_NAMES}, {})
        video_predictor = worker.backend.video(params, delta, keyframe_every)
    except ServiceError as error:
        await websocket.send_json(error.body())
        await websocket.close(code=WS_CLOSE_POLICY)
        return
    await LiveSession(state, websocket, worker, params, video_predictor).run()


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


class LiveSession:
    """One live WebSocket: a receiver task keeps only the newest frame; the main loop answers it. Frames go
    through the connection's own video predictor (delta frames unless ``delta=false``)."""

    def __init__(self, state: AppState, websocket: WebSocket, worker: ModelWorker, params: Params, video_predictor):
        self.state, self.settings = state, state.settings
        self.ws, self.worker, self.params, self.video = websocket, worker, params, video_predictor
        self.latest = None
        self.wake_up, self.closed = asyncio.Event(), asyncio.Event()
        self.received = self.dropped = 0
        self.close_reason: str | None = None

    async def receiver(self):
        settings = self.settings
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
            self.state.metrics.drop_frames(1)
        self.latest = (self.received, data)
        self.received += 1
        self.wake_up.set()

    async def answer(self, seq: int, data: bytes) -> dict:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.settings.timeout_s
        held: list[int] = []
        try:
            if len(data) > self.settings.max_upload_bytes:
                raise ServiceError(413, "upload_too_large", "frame exceeds the upload limit")
            held.append(await self.state.budget.reserve(len(data), deadline))
            job = await decoded_job(self.state, "frame", data, self.worker, self.params, held, deadline,
                                    video=self.video)
            result = await run_job(self.state, self.worker, job, deadline)
            self.state.metrics.add_result(self.worker.backend.name, result.get("spikes"))
            return {"type": "detections", "frame": seq, "dropped": self.dropped,
                    **response_of(self.worker, self.params, result, 0.0, job, t0)}
        except ServiceError as error:
            return {"type": "error", "frame": seq, **error.body()}
        except Exception as error:  # noqa: BLE001 - one bad frame never closes the socket
            log.error("live frame failed", exc_info=(type(error), error, error.__traceback__))
            return {"type": "error", "frame": seq, "error": "internal", "detail": "internal error"}
        finally:
            await self.state.budget.release_all(held)

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

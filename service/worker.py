"""One inference thread per model: a bounded queue, micro-batching, streaming jobs, graceful stop.

torch is not async: every forward runs in the worker's thread; the event loop only waits on futures.
``predict`` jobs that arrive within ``batch_window_ms`` of each other and share the same ``Params`` are run
as ONE ``predict`` call on the list of their images (up to ``max_batch``). If that call fails, its members are
run one by one, so that only the request that caused the failure fails. A job's ``cancelled`` event (timeout,
client gone) stops the model within one time step; a batch stops only once all its members are cancelled.
Jobs that cost more than a default request (``Job.heavy``: more wake or sleep steps, one spike per step) wait in
a second queue that is served only while no ordinary job waits, so that a few of them cannot starve the rest
(under constant load they may time out instead).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from detector import RunCancelled

from .backends import Backend, Params
from .errors import ServiceError
from .memory import release_freed

log = logging.getLogger("casc.service")


class QueueFull(Exception):
    """The worker's queue is full (answered 503 with Retry-After)."""


class AllCancelled:
    """The cancel flag of a batched call: set once every member's own flag is set."""

    def __init__(self, jobs: list["Job"]):
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(j.cancelled.is_set() for j in self.jobs)


def inference_failed(backend: Backend, error: BaseException) -> ServiceError:
    """The reply to a model failure: a stable code and a short message; the exception goes to the log only."""
    log.error("model %s failed on a request", backend.name, exc_info=(type(error), error, error.__traceback__))
    return ServiceError(500, "inference_failed", "the model could not process this image (details are in the "
                                                 "server log)")


@dataclass
class Job:
    kind: str  # "predict", "stream" or "frame" (a video frame through ``video``, its client's own predictor)
    image: object
    params: Params
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    batch_size: int = 1
    # stream jobs: the worker calls emit(event) per event and emit(None) at the end
    emit: object = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    scale: tuple[float, float] = (1.0, 1.0)  # model-input pixels -> original pixels (x, y)
    size: tuple[int, int] | None = None  # the original image's (width, height)
    heavy: bool = False  # costs more than a default request: served when no ordinary job waits
    video: object = None  # frame jobs: the client's per-frame predictor (Backend.video)


_STOP = object()


class ModelWorker:
    def __init__(self, backend: Backend, queue_size: int = 16, batch_window_ms: float = 5.0, max_batch: int = 8,
                 metrics=None):
        self.backend = backend
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.heavy: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.backlog: collections.deque = collections.deque()  # taken from the queue, other params
        self.window = max(0.0, batch_window_ms) / 1000.0
        self.max_batch = max(1, max_batch)
        self.metrics = metrics
        self.busy = False
        self.thread = threading.Thread(target=self._run, name=f"worker-{backend.name}", daemon=True)
        self._stopping = False

    # -- client side (event loop) --

    def start(self) -> None:
        self.thread.start()

    def depth(self) -> int:
        return self.queue.qsize() + self.heavy.qsize() + len(self.backlog) + (1 if self.busy else 0)

    def submit(self, job: Job) -> Job:
        if self._stopping:
            raise QueueFull("the service is shutting down")
        lane = self.heavy if job.heavy else self.queue
        try:
            lane.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"model {self.backend.name!r}: queue full ({lane.maxsize} waiting)") from None
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued and in flight, then end the thread."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self.thread.is_alive():
            try:
                self.queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self.thread.join(max(0.0, deadline - time.monotonic()))

    # -- worker thread --

    HEAVY_POLL_S = 0.05  # how often an idle worker looks at the heavy queue

    def _next(self):
        """The backlog first, then ordinary jobs, then heavy ones."""
        while True:
            if self.backlog:
                return self.backlog.popleft()
            try:
                return self.queue.get(timeout=self.HEAVY_POLL_S)
            except queue.Empty:
                pass
            try:
                return self.heavy.get_nowait()
            except queue.Empty:
                pass

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is _STOP:
                while not self.heavy.empty():  # heavy jobs queued before the stop still run
                    self.backlog.append(self.heavy.get_nowait())
                if self.backlog:  # finish the rest first
                    self.backlog.append(_STOP)
                    continue
                return
            if job.kind == "stream":
                self._stream(job)
                continue
            if job.kind == "frame":
                self._frame(job)
                continue
            batch = [job]
            for other in list(self.backlog):  # earlier arrivals with the same settings join first
                if len(batch) >= self.max_batch:
                    break
                if other is not _STOP and other.kind == "predict" and other.params == job.params:
                    self.backlog.remove(other)
                    batch.append(other)
            deadline = time.perf_counter() + self.window
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 and self.queue.empty():
                    break
                try:
                    other = self.queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if other is not _STOP and other.kind == "predict" and other.params == job.params:
                    batch.append(other)
                else:
                    self.backlog.append(other)
                    if other is _STOP:
                        break
            self._predict(batch)

    def _predict(self, batch: list[Job]) -> None:
        batch = [j for j in batch if not j.cancelled.is_set() and j.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.busy = True
        start = time.perf_counter()
        for j in batch:
            j.started, j.batch_size = start, len(batch)
        try:
            results = self._call(batch)
        except RunCancelled:  # every member timed out or went away: nobody waits for an answer
            for j in batch:
                j.future.set_exception(ServiceError(504, "timeout", "cancelled"))
        except Exception as error:  # noqa: BLE001 - find the member that fails, answer the rest
            if len(batch) == 1:
                batch[0].future.set_exception(inference_failed(self.backend, error))
            else:
                self._one_by_one(batch)
        else:
            if self.metrics is not None:
                self.metrics.observe_batch(self.backend.name, len(batch), time.perf_counter() - start)
            for j, r in zip(batch, results):
                j.future.set_result(r)
        finally:
            self.busy = False
            release_freed()  # a batch's activations: give them back before the next one

    def _call(self, batch: list[Job]) -> list[dict]:
        cancel = batch[0].cancelled if len(batch) == 1 else AllCancelled(batch)
        return self.backend.predict([j.image for j in batch], batch[0].params, cancel=cancel)

    def _one_by_one(self, batch: list[Job]) -> None:
        for j in batch:
            j.batch_size = 1
            try:
                (result,) = self._call([j])
            except RunCancelled:
                j.future.set_exception(ServiceError(504, "timeout", "cancelled"))
            except Exception as error:  # noqa: BLE001
                j.future.set_exception(inference_failed(self.backend, error))
            else:
                j.future.set_result(result)

    def _frame(self, job: Job) -> None:
        """A video frame, alone: its predictor holds the video's state (a cancelled or failed frame leaves the next
        one a keyframe, see ``DeltaSession``)."""
        if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
            return
        self.busy = True
        job.started = time.perf_counter()
        try:
            job.future.set_result(self.backend.frame(job.video, job.image, job.params, cancel=job.cancelled))
        except RunCancelled:
            job.future.set_exception(ServiceError(504, "timeout", "cancelled"))
        except Exception as error:  # noqa: BLE001
            job.future.set_exception(inference_failed(self.backend, error))
        finally:
            self.busy = False
            release_freed()

    def _stream(self, job: Job) -> None:
        if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
            return
        self.busy = True
        job.started = time.perf_counter()
        events = None
        try:
            events = self.backend.stream(job.image, job.params, cancel=job.cancelled)
            for event in events:
                if job.cancelled.is_set():  # client gone or timed out: stop computing
                    break
                job.emit(event)
            job.future.set_result(None)
        except RunCancelled:
            job.future.set_result(None)
        except Exception as error:  # noqa: BLE001
            job.future.set_exception(inference_failed(self.backend, error))
        finally:
            if events is not None and hasattr(events, "close"):
                events.close()
            job.emit(None)
            self.busy = False
            release_freed()

"""One inference thread per model: a bounded queue, micro-batching, streaming jobs, graceful stop.

torch is not async: every forward runs in the worker's thread; the event loop only waits on futures.
``predict`` jobs that arrive within ``batch_window_ms`` of each other and share the same ``Params`` are run
as ONE ``predict`` call on the list of their images (up to ``max_batch``).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from .backends import Backend, Params


class QueueFull(Exception):
    """The worker's queue is full (answered 503 with Retry-After)."""


@dataclass
class Job:
    kind: str  # "predict" or "stream"
    image: object
    params: Params
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    batch_size: int = 1
    # stream jobs: the worker calls emit(event) per event and emit(None) at the end
    emit: object = None
    cancelled: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class ModelWorker:
    def __init__(self, backend: Backend, queue_size: int = 16, batch_window_ms: float = 5.0, max_batch: int = 8,
                 metrics=None):
        self.backend = backend
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
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
        return self.queue.qsize() + len(self.backlog) + (1 if self.busy else 0)

    def submit(self, job: Job) -> Job:
        if self._stopping:
            raise QueueFull("the service is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"model {self.backend.name!r}: queue full ({self.queue.maxsize} waiting)") from None
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

    def _next(self, timeout: float | None):
        if self.backlog:
            return self.backlog.popleft()
        return self.queue.get(timeout=timeout) if timeout is not None else self.queue.get()

    def _run(self) -> None:
        while True:
            job = self._next(None)
            if job is _STOP:
                if self.backlog:  # finish the rest first
                    self.backlog.append(_STOP)
                    continue
                return
            if job.kind == "stream":
                self._stream(job)
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
            results = self.backend.predict([j.image for j in batch], batch[0].params)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting request
            for j in batch:
                j.future.set_exception(error)
        else:
            if self.metrics is not None:
                self.metrics.observe_batch(self.backend.name, len(batch), time.perf_counter() - start)
            for j, r in zip(batch, results):
                j.future.set_result(r)
        finally:
            self.busy = False

    def _stream(self, job: Job) -> None:
        if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
            return
        self.busy = True
        job.started = time.perf_counter()
        events = None
        try:
            events = self.backend.stream(job.image, job.params)
            for event in events:
                if job.cancelled.is_set():  # client gone or timed out: stop computing
                    break
                job.emit(event)
            job.future.set_result(None)
        except BaseException as error:  # noqa: BLE001
            job.future.set_exception(error)
        finally:
            if events is not None and hasattr(events, "close"):
                events.close()
            job.emit(None)
            self.busy = False

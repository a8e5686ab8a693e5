"""What the service's routers share: one ``AppState`` on ``app.state.service`` (settings, metrics, models and
their workers, the byte budgets, readiness), and the lifespan that loads and drains the models."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from .backends import Backend, inference_memory, largest_input, load_backend, warmup
from .budget import ByteBudget
from .config import Settings
from .errors import ServiceError
from .memory import InferenceMemory
from .metrics import Metrics
from .params import request_values, to_params
from .worker import ModelWorker


@dataclass
class AppState:
    """The service's state: ``backends`` (loaded models by name, the first the default), their ``workers`` (one
    queue and thread each), ``budget`` (bytes in memory) and ``disk`` (video temp files), the models' measured
    ``inference`` memory (``--budget-inference``), the browser ``origins`` allowed, and readiness (``ready``;
    ``stopping`` after SIGTERM)."""

    settings: Settings
    metrics: Metrics
    budget: ByteBudget
    disk: ByteBudget
    origins: list[str]
    backends: dict[str, Backend] = field(default_factory=dict)
    workers: dict[str, ModelWorker] = field(default_factory=dict)
    inference: dict[str, InferenceMemory] = field(default_factory=dict)
    ready: bool = False
    stopping: bool = False

    @classmethod
    def create(cls, settings: Settings, backends: dict[str, Backend] | None, origins: list[str]) -> "AppState":
        state = cls(settings, Metrics(), ByteBudget(settings.max_inflight_bytes),
                    ByteBudget(settings.max_video_disk_bytes, "on disk (video temp files)", "video_too_large"),
                    origins, dict(backends or {}))
        state.metrics.queue_depth = lambda: {name: w.depth() for name, w in state.workers.items()}
        return state

    def begin_shutdown(self) -> None:
        """Called on SIGTERM, before the listener closes: readiness fails so load balancers stop sending."""
        self.ready, self.stopping = False, True

    def worker_for(self, name: str | None) -> ModelWorker:
        """The worker of model ``name`` (None: the default); still served while stopping: readiness tells load
        balancers to go elsewhere."""
        if not self.workers:
            raise ServiceError(503, "not_ready", "models are loading", {"Retry-After": "1"})
        if name is None:
            return next(iter(self.workers.values()))
        if name not in self.workers:
            raise ServiceError(404, "unknown_model", f"unknown model {name!r}; loaded: {', '.join(self.workers)}")
        return self.workers[name]

    def budgeted(self, name: str) -> InferenceMemory:
        """What the budget reserves for model ``name``'s inference (``InferenceMemory.within``; none when it is not
        measured)."""
        measured = self.inference.get(name, InferenceMemory(0, 0))
        return measured.within(self.budget.limit, len(self.backends))

    async def measure_inference(self, backend: Backend) -> None:
        """Measure ``backend``'s inference memory at its largest input with a default request's schedule (in
        ``inference``), and say on stderr what the budget reserves for it."""
        settings, name = self.settings, backend.name
        params = to_params(request_values({}, {}), backend, settings)
        measured = await run_in_threadpool(inference_memory, backend, params, settings.max_aspect)
        if measured is None:
            print(f"casc serve: {name}: inference memory is not budgeted (no resettable peak RSS on this system)",
                  file=sys.stderr, flush=True)
            return
        self.inference[name] = measured
        w, h = largest_input(backend, settings.max_aspect)
        print(f"casc serve: {name}: inference takes {mb(measured.per_image)} per image + {mb(measured.fixed)} per "
              f"batch (peak RSS at {w} x {h})", file=sys.stderr, flush=True)
        budgeted = self.budgeted(name)
        if budgeted != measured:
            print(f"casc serve: {name}: its inference does not fit beside requests in --max-inflight-mb "
                  f"{settings.max_inflight_mb:g}: reserving {mb(budgeted.per_image)} per image + "
                  f"{mb(budgeted.fixed)} per batch; peak RSS may exceed the budget", file=sys.stderr, flush=True)

    def caps(self) -> dict[str, int]:
        """The widest caps over the loaded models (``Settings.caps``), as the OpenAPI schema states them."""
        levels = [b.levels for b in self.backends.values()] or [1]
        every = [self.settings.caps(n) for n in levels]
        return {name: max(c[name] for c in every) for name in every[0]}

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Load the models not given (``settings.models``), warm each up and start its worker; on shutdown
        (uvicorn has already let in-flight requests finish) drain what is queued."""
        import torch

        settings = self.settings
        torch.set_num_threads(max(1, int(settings.threads)))
        if not self.backends:
            for spec in settings.models:
                backend = await run_in_threadpool(load_backend, spec, settings.device, settings.allow_unverified,
                                                  settings.analog)
                self.backends[backend.name] = backend
        if not self.backends:
            raise RuntimeError("no model to serve")
        fixed: list[int] = []  # the workers' fixed inference parts, held while they run (one batch at a time each)
        for name, backend in self.backends.items():
            await run_in_threadpool(warmup, backend)
            if settings.budget_inference:
                await self.measure_inference(backend)
                fixed.append(await self.budget.reserve(self.budgeted(name).fixed, time.monotonic()))
            worker = ModelWorker(backend, settings.queue_size, settings.batch_window_ms, settings.max_batch,
                                 self.metrics)
            worker.start()
            self.workers[name] = worker
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            for worker in self.workers.values():
                await run_in_threadpool(worker.stop, settings.timeout_s)
            await self.budget.release_all(fixed)
            print(f"casc serve: stopped; {len(self.workers)} model worker(s) drained", file=sys.stderr, flush=True)


def mb(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MB"


def state_of(connection: HTTPConnection) -> AppState:
    """The ``AppState`` of the app serving ``connection`` (a request or a WebSocket): the routers' dependency."""
    return connection.app.state.service

"""Liveness, readiness, the loaded models and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ..errors import ServiceError
from ..schemas import ErrorResponse, Health, ModelList, Ready
from ..state import AppState, state_of

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["service"], summary="liveness")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, tags=["service"], summary="readiness: models loaded, not stopping",
            responses={503: {"model": ErrorResponse}})
async def readyz(state: AppState = Depends(state_of)):
    if state.stopping:
        raise ServiceError(503, "stopping", "the service is shutting down", {"Retry-After": "1"})
    if not state.ready:
        raise ServiceError(503, "not_ready", "models are loading", {"Retry-After": "1"})
    return {"status": "ready", "models": list(state.workers)}


@router.get("/v1/models", response_model=ModelList, tags=["models"], summary="loaded models (names, sha256)")
async def models(state: AppState = Depends(state_of)):
    default = next(iter(state.backends))
    return {"default": default, "models": [{**b.describe(), "default": name == default,
                                            "max_wake": state.settings.wake_limit(b.levels),
                                            "max_sleep": state.settings.max_sleep,
                                            "inference_bytes": inference_bytes(state, name)}
                                           for name, b in state.backends.items()]}


def inference_bytes(state: AppState, name: str) -> dict | None:
    """Model ``name``'s measured inference memory and what the budget reserves of it; None when not measured."""
    if name not in state.inference:
        return None
    measured, budgeted = state.inference[name], state.budgeted(name)
    return {"per_image": measured.per_image, "fixed": measured.fixed, "budgeted_per_image": budgeted.per_image,
            "budgeted_fixed": budgeted.fixed}


@router.get("/metrics", response_class=PlainTextResponse, tags=["service"], summary="Prometheus metrics")
async def prometheus(state: AppState = Depends(state_of)):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

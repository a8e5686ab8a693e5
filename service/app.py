"""The FastAPI application: ``create_app(settings, backends=None)``.

Endpoints: ``/healthz``, ``/readyz``, ``/v1/models``, ``/metrics`` (``routes/health.py``), ``/v1/detect`` and
``/v1/detect/stream`` (NDJSON or SSE; ``routes/detect.py``), ``/v1/video`` (NDJSON per frame; ``routes/video.py``),
``WS /v1/stream`` (live frames, latest wins; ``routes/live.py``), ``/`` (web page; ``routes/page.py``), ``/docs``
and ``/redoc`` (served from the package, no CDN). The routers share one ``AppState`` (``state.py``) on
``app.state.service``. Every error is JSON ``{"error": code, "detail": text}`` with a stable code
(``middleware.py``); exception texts go to the log, never into a reply.
"""

from __future__ import annotations

from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from .backends import Backend
from .config import Settings
from .imaging import set_pixel_limit
from .middleware import add_error_handlers, add_middleware, own_origins
from .openapi import install_openapi
from .routes import detect, health, live, page, video
from .state import AppState


def create_app(settings: Settings | None = None, backends: dict[str, Backend] | None = None):
    """The service's app serving ``backends`` (None: ``settings.models``, loaded when it starts)."""
    settings = settings or Settings()
    set_pixel_limit(settings.max_pixels)
    origins = [o.lower().rstrip("/") for o in settings.allowed_origins] + own_origins(settings.host, settings.port)
    state = AppState.create(settings, backends, origins)
    app = FastAPIOffline(title="CASC spiking detectors", version="1.0",
                         description="Spiking object detectors (CASC conversion) over HTTP: detect, anytime "
                                     "streaming, video, live frames.", lifespan=state.lifespan)
    app.state.service = state
    install_openapi(app, state)
    add_middleware(app, origins, settings.limit_concurrency, state.metrics)
    add_error_handlers(app)
    for router in (health.router, detect.router, video.router, live.router, page.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app

"""The service's ASGI middleware (request metrics, the Origin check, admission) and its error replies: every
error is JSON ``{"error": code, "detail": text}`` with a stable code; exception texts go to the log, never into a
reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServiceError
from .metrics import Metrics
from .params import validation_detail

log = logging.getLogger("casc.service")
KNOWN_PATHS = {"/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/detect", "/v1/detect/stream",
               "/v1/video", "/v1/stream", "/demo-image", "/openapi.json", "/docs", "/redoc"}
STATUS_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                406: "not_acceptable", 408: "body_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "invalid_parameter", 429: "too_many_requests", 503: "unavailable", 504: "timeout"}
WS_CLOSE_TRY_AGAIN = 1013
PROBE_PATHS = {"/healthz", "/readyz", "/metrics"}  # always answered (never counted by admission)
DISCARD_BYTES, DISCARD_S = 32 << 20, 2.0  # what a refused request's body may still send before the 503


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def own_origins(host: str, port: int) -> list[str]:
    """The origins of the pages this server serves, from the address it listens on (never from a request's
    ``Host`` header, which a DNS-rebinding page sets to anything). Listening on a loopback or wildcard address:
    the loopback names; a public name has to be given with ``--allow-origin``."""
    names = LOOPBACK_HOSTS if host in WILDCARD_HOSTS or host in ("127.0.0.1", "localhost", "::1") else \
        (f"[{host}]" if ":" in host else host,)
    return [f"http://{name}:{port}" for name in names]


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    """No ``Origin`` (not a browser): allowed. Else the page's origin must be in ``allowed`` (the configured
    list and this server's own origins)."""
    if not origin:
        return True
    return "*" in allowed or origin.lower().rstrip("/") in allowed


class MetricsMiddleware:
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
            endpoint = path if path in KNOWN_PATHS else ("/static" if path.startswith("/static") else "other")
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status["code"],
                                         time.perf_counter() - start)


class OriginMiddleware:
    """Requests a browser sends from a page of another origin are refused (403); WebSockets are checked in
    their handler (a close code, not an HTTP reply)."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not origin_allowed(headers.get("origin"), self.allowed):
                response = JSONResponse({"error": "origin_not_allowed", "detail": "requests from this page's "
                                         "origin are not allowed (casc serve --allow-origin)"}, status_code=403)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class AdmissionMiddleware:
    """At most ``limit`` requests and WebSockets in flight; the rest are refused at once with the service's JSON
    503 and Retry-After (a WebSocket: close code 1013, try again later). Probes (``PROBE_PATHS``) are never
    counted nor refused, so liveness and readiness are answered whatever the load. This replaces uvicorn's
    ``limit_concurrency``, which counts open connections: idle sockets would refuse every request, probes too."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, int(limit), metrics
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("path") in PROBE_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            self.metrics.reject("-", "over_limit")
            if scope["type"] == "websocket":  # accepted only to say why it closes (a refused handshake is a bare 403)
                await receive()
                await send({"type": "websocket.accept"})
                return await send({"type": "websocket.close", "code": WS_CLOSE_TRY_AGAIN,
                                   "reason": f"busy: {self.limit} requests in flight"})
            response = JSONResponse({"error": "busy", "detail": f"the service is at its limit of {self.limit} "
                                     "requests in flight; retry after the Retry-After seconds"}, status_code=503,
                                    headers={"Retry-After": "1"})
            await self.discard_body(receive)
            return await response(scope, receive, send)
        self.active += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def discard_body(self, receive) -> None:
        """Read (and drop) what the client is still sending, up to ``DISCARD_BYTES`` for ``DISCARD_S``: a reply
        sent over an unread body makes the close a TCP reset, and the client would see no 503 at all."""
        end, size = time.monotonic() + DISCARD_S, 0
        with contextlib.suppress(asyncio.TimeoutError):
            while size <= DISCARD_BYTES:
                message = await asyncio.wait_for(receive(), max(0.001, end - time.monotonic()))
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
                size += len(message.get("body", b""))


def add_middleware(app, allowed_origins: list[str], limit_concurrency: int, metrics: Metrics) -> None:
    """Origin check innermost, then admission, then metrics (outermost: every reply is counted)."""
    app.add_middleware(OriginMiddleware, allowed=allowed_origins)
    app.add_middleware(AdmissionMiddleware, limit=limit_concurrency, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)


async def _service_error(request, error: ServiceError):
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _validation_error(request, error: RequestValidationError):
    return JSONResponse({"error": "invalid_parameter", "detail": validation_detail(error)}, status_code=422)


async def _http_error(request, error: StarletteHTTPException):
    code = STATUS_CODES.get(error.status_code, "error")
    return JSONResponse({"error": code, "detail": str(error.detail)}, status_code=error.status_code,
                        headers=getattr(error, "headers", None))


async def _internal_error(request, error: Exception):
    log.error("unhandled error on %s %s", request.method, request.url.path,
              exc_info=(type(error), error, error.__traceback__))
    return JSONResponse({"error": "internal", "detail": "internal error (details are in the server log)"},
                        status_code=500)


def add_error_handlers(app) -> None:
    """One JSON shape for every error, no exception text."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

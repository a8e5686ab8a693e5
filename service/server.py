"""``casc serve``: command-line options and the uvicorn start.

    casc serve --model yolov8n-bundled --model rcnn-r18-bundled --host 0.0.0.0 --port 8000 --threads 4

Models are loaded before the server starts, so a bad ``--model`` is a clear error and exit status 2, never a
half-started server. Without ``--model`` the first QANN of the manifest is served. A ``--model PATH`` is served
under the name of the manifest entry whose sha256 it matches; a file that matches none is refused unless
``--allow-unverified`` is given (then it is served under its file name, ``verified: false`` in ``/v1/models``).

Connections are bounded: a request's headers must arrive within ``--header-timeout-s`` and its body within
``--body-timeout-s``; idle keep-alive connections close after ``--keep-alive-s``; at most
``--limit-concurrency`` requests in flight at once, the rest refused at once with a JSON 503 and Retry-After
(the service's admission, ``service.middleware``: open connections are not counted, so idle sockets cannot turn
``/healthz`` away, and probes are always answered). On SIGTERM, ``/readyz`` answers 503 at once, the listener closes
``--shutdown-delay-s`` later, in-flight requests finish, queued work drains, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from detector.devices import resolve_device
from detector.weights import ENGINES

from .config import Settings


def default_demo_image() -> str | None:
    """The first bundled val image when the bundled benchmark has been generated (serving never generates it)."""
    from detector.data import bundled_root

    image = bundled_root() / "images" / "val" / "000000.jpg"
    return str(image) if image.is_file() else None


CHOICES = {"engine": ENGINES}  # named by the library (Settings would import torch for them)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field of ``Settings``: its help, default and bounds as the field declares them."""
    for f in dataclasses.fields(Settings):
        options = dict(f.metadata["argparse"])
        if f.name in CHOICES:
            options["choices"] = CHOICES[f.name]
        if "action" not in options and "type" not in options and f.default is not None:
            options["type"] = type(f.default)
        default = default_demo_image() if f.name == "demo_image" else \
            None if f.default is dataclasses.MISSING else f.default
        parser.add_argument(_flag(f), dest=f.name, default=default, help=f.metadata["help"], **options)
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (debug, info, warning, error)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from ``casc serve``'s options, each within its declared lower bound (a ValueError naming it)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    for f in dataclasses.fields(Settings):
        value, least, above = values[f.name], f.metadata["least"], f.metadata["above"]
        if value is not None and least is not None and value < least:
            raise ValueError(f"{_flag(f)} must be >= {least}")
        if value is not None and above is not None and not value > above:
            raise ValueError(f"{_flag(f)} must be > {above}")
    analog = values["analog"]
    values["analog"] = None if not analog else "auto" if analog == "auto" else \
        [p.strip() for p in analog.split(",") if p.strip()]
    values["models"], values["allowed_origins"] = list(values["models"] or []), list(values["allowed_origins"] or [])
    return Settings(**values)


def guarded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol with a header deadline: a connection that has not sent a complete request line
    and headers within ``header_timeout_s`` (of opening, or of its previous response) is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_header_timer()  # the request's headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._cancel_header_timer()
            if not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _cancel_header_timer(self) -> None:
            timer, self._header_timer = getattr(self, "_header_timer", None), None
            if timer is not None:
                timer.cancel()

        def _headers_late(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11


def graceful_server(config, begin_shutdown, delay_s: float):
    """A uvicorn server whose SIGTERM/SIGINT first turns readiness off, closes the listener ``delay_s`` later,
    lets in-flight work finish, and then exits with status 0 (uvicorn would re-raise the signal: 143)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        stop_at: float | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.stop_at is None:  # the first signal: stop taking traffic, then shut down
                begin_shutdown()
                self.stop_at = time.monotonic() + delay_s
                return
            super().handle_exit(sig, frame)  # a second one: uvicorn's own (SIGINT twice forces the exit)
            self._captured_signals.clear()

        async def on_tick(self, counter: int) -> bool:
            if self.stop_at is not None and time.monotonic() >= self.stop_at:
                return True
            return await super().on_tick(counter)

    return GracefulServer(config)


def main(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from .app import create_app
    from .backends import default_model_name, load_backend
    from .memory import limit_arenas

    settings = settings_from_args(args)
    resolve_device(settings.device)  # a one-line error for a device this machine does not have
    limit_arenas()
    torch.set_num_threads(settings.threads)
    if not settings.models:
        settings.models = [default_model_name()]
    backends = {}
    for spec in settings.models:
        backend = load_backend(spec, settings.device, settings.allow_unverified, settings.analog, settings.engine,
                               settings.provider, settings.threads)
        if backend.name in backends:
            raise ValueError(f"two models are named {backend.name!r}")
        backends[backend.name] = backend
        trust = "verified against the manifest" if backend.verified else "UNVERIFIED (--allow-unverified)"
        print(f"casc serve: loaded {backend.name} ({backend.family}, L={backend.levels}, {backend.engine}, sha256 "
              f"{backend.sha256[:16]}..., {trust})", file=sys.stderr, flush=True)
    app = create_app(settings, backends)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            http=guarded_h11(settings.header_timeout_s),
                            ws_max_size=max(settings.max_upload_bytes, 1 << 16),
                            timeout_keep_alive=settings.keep_alive_s,
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5, lifespan="on")
    server = graceful_server(config, app.state.service.begin_shutdown, settings.shutdown_delay_s)
    server.run()
    return 0 if server.started else 1


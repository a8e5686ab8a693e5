"""``casc serve``: command-line options and the uvicorn start.

    casc serve --model yolov8n-bundled --model rcnn-r18-bundled --host 0.0.0.0 --port 8000 --threads 4

Models are loaded before the server starts, so a bad ``--model`` is a clear error and exit status 2, never a
half-started server. Without ``--model`` the first QANN of the manifest is served. A ``--model PATH`` is served
under the name of the manifest entry whose sha256 it matches; a file that matches none is refused unless
``--allow-unverified`` is given (then it is served under its file name, ``verified: false`` in ``/v1/models``).

Connections are bounded: a request's headers must arrive within ``--header-timeout-s`` and its body within
``--body-timeout-s``; idle keep-alive connections close after ``--keep-alive-s``; at most
``--limit-concurrency`` requests in flight at once, the rest refused at once with a JSON 503 and Retry-After
(the service's admission, ``service.app``: open connections are not counted, so idle sockets cannot turn
``/healthz`` away, and probes are always answered). On SIGTERM, ``/readyz`` answers 503 at once, the listener closes
``--shutdown-delay-s`` later, in-flight requests finish, queued work drains, and the exit status is 0.
"""

from __future__ import annotations

import argparse
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--model", action="append", default=None, metavar="NAME|PATH",
                        help="bundled model name or checkpoint path; repeat to serve several (the first is the "
                             "default); default: the first QANN entry of weights/manifest.json")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="serve a checkpoint file whose sha256 matches no manifest entry (trusted files only)")
    parser.add_argument("--analog", default=None, metavar="auto|PATHS",
                        help="YOLO11 hybrids: keep attention modules as analog islands ('auto': all of them, or "
                             "comma-separated module paths)")
    parser.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface, e.g. in a "
                                                         "container behind its port mapping)")
    parser.add_argument("--port", type=int, default=d.port, help="TCP port")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels, help="image width*height limit")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help="request body limit (413)")
    parser.add_argument("--max-inflight-mb", type=float, default=d.max_inflight_mb,
                        help="bytes held by all requests together: bodies, decoding, queued images")
    parser.add_argument("--max-aspect", type=float, default=d.max_aspect, help="longest/shortest side limit (422)")
    parser.add_argument("--max-wake", type=int, default=None, help="wake steps a request may ask for "
                                                                   "(default: 4 x the model's levels)")
    parser.add_argument("--max-sleep", type=int, default=d.max_sleep,
                        help="sleep steps a request may ask for, and the cap of sleep=auto")
    parser.add_argument("--queue-size", type=int, default=d.queue_size, help="waiting requests per model (503)")
    parser.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per-request timeout (504); the "
                                                                             "model stops within one time step")
    parser.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                        help="micro-batching: wait this long for requests to join a batch (0: no waiting)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="images per predict call (1: no batching)")
    parser.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                        help="frames decoded from one uploaded video at most")
    parser.add_argument("--max-video-s", type=float, default=d.max_video_s,
                        help="longest video accepted, in seconds from its header (413)")
    parser.add_argument("--max-video-disk-mb", type=float, default=d.max_video_disk_mb,
                        help="temp-file space of uploaded videos, all requests together (503 when full); keep it "
                             "below the size of the volume holding the temp dir")
    parser.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                        help="seconds for a request body to arrive (408)")
    parser.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                        help="seconds for a request's headers to arrive (the connection is closed)")
    parser.add_argument("--keep-alive-s", type=int, default=d.keep_alive_s,
                        help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                        help="requests and WebSockets in flight at once; more get a JSON 503 with Retry-After at "
                             "once (/healthz, /readyz and /metrics are never counted nor refused)")
    parser.add_argument("--ws-idle-s", type=float, default=d.ws_idle_s,
                        help="seconds a WebSocket may stay silent before it is closed")
    parser.add_argument("--ws-max-s", type=float, default=d.ws_max_s,
                        help="seconds a WebSocket may stay open in all")
    parser.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                        help="a browser origin (scheme://host:port) allowed besides this server's own (http://HOST:PORT "
                             "of --host, or the loopback names for 127.0.0.1 / 0.0.0.0; the Host header is never "
                             "trusted); the public name of a deployment's web page goes here; '*' for any")
    parser.add_argument("--shutdown-delay-s", type=float, default=d.shutdown_delay_s,
                        help="after SIGTERM, /readyz answers 503 this long before the listener closes")
    parser.add_argument("--device", default=d.device, help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--engine", default=d.engine, choices=ENGINES,
                        help="what runs the spiking networks: the PyTorch simulator, or ONNX Runtime on the exported "
                             "step graphs (exported on first use into the cache; no spike counts, no "
                             "/v1/detect/stream)")
    parser.add_argument("--provider", default=d.provider, help="ONNX Runtime's execution provider: cpu, cuda, tensorrt "
                        "(--threads sets its threads too)")
    parser.add_argument("--demo-image", default=default_demo_image(),
                        help="an image served at /demo-image for the web page's Demo button (default: a bundled val "
                             "image, once the bundled benchmark is on disk)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (debug, info, warning, error)")


POSITIVE = ("max_upload_mb", "max_inflight_mb", "timeout_s", "max_video_s", "max_video_disk_mb", "body_timeout_s",
            "header_timeout_s", "ws_idle_s", "ws_max_s")
AT_LEAST_ONE = ("threads", "max_pixels", "queue_size", "max_batch", "max_video_frames", "max_sleep",
                "keep_alive_s", "limit_concurrency")


def settings_from_args(args: argparse.Namespace) -> Settings:
    for name in AT_LEAST_ONE:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in POSITIVE:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if args.max_aspect < 1:
        raise ValueError("--max-aspect must be >= 1")
    if args.max_wake is not None and args.max_wake < 1:
        raise ValueError("--max-wake must be >= 1")
    if args.batch_window_ms < 0 or args.shutdown_delay_s < 0:
        raise ValueError("--batch-window-ms and --shutdown-delay-s must be >= 0")
    analog = None
    if args.analog:
        analog = "auto" if args.analog == "auto" else [p.strip() for p in args.analog.split(",") if p.strip()]
    return Settings(models=list(args.model or []), host=args.host, port=args.port, threads=args.threads,
                    max_pixels=args.max_pixels, max_upload_mb=args.max_upload_mb,
                    max_inflight_mb=args.max_inflight_mb, max_aspect=args.max_aspect, max_wake=args.max_wake,
                    max_sleep=args.max_sleep, queue_size=args.queue_size, timeout_s=args.timeout_s,
                    batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
                    max_video_frames=args.max_video_frames, max_video_s=args.max_video_s,
                    max_video_disk_mb=args.max_video_disk_mb, device=args.device,
                    demo_image=args.demo_image, allow_unverified=args.allow_unverified, analog=analog,
                    engine=args.engine, provider=args.provider,
                    body_timeout_s=args.body_timeout_s, header_timeout_s=args.header_timeout_s,
                    keep_alive_s=args.keep_alive_s, limit_concurrency=args.limit_concurrency,
                    ws_idle_s=args.ws_idle_s, ws_max_s=args.ws_max_s, allowed_origins=list(args.allow_origin or []),
                    shutdown_delay_s=args.shutdown_delay_s)


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


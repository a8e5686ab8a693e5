"""``casc serve``: command-line options and the uvicorn start.

    casc serve --model yolov8n-bundled --model rcnn-r18-bundled --host 0.0.0.0 --port 8000 --threads 4

Models are loaded (sha256-checked) before the server starts, so a bad ``--model`` is a clear error and
exit status 2, never a half-started server. Without ``--model`` the first QANN of the manifest is served.
"""

from __future__ import annotations

import argparse
import sys

from .config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--model", action="append", default=None, metavar="NAME|PATH",
                        help="bundled model name or checkpoint path; repeat to serve several (the first is the "
                             "default); default: the first QANN entry of weights/manifest.json")
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels, help="image width*height limit")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help="request body limit (413)")
    parser.add_argument("--queue-size", type=int, default=d.queue_size, help="waiting requests per model (503)")
    parser.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per-request timeout (504)")
    parser.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                        help="micro-batching: wait this long for requests to join a batch (0: no waiting)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="images per predict call (1: no batching)")
    parser.add_argument("--max-video-frames", type=int, default=d.max_video_frames)
    parser.add_argument("--max-video-s", type=float, default=d.max_video_s)
    parser.add_argument("--device", default=d.device, help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--demo-image", default=None, help="an image served at /demo-image for the web page")
    parser.add_argument("--log-level", default="info")


def settings_from_args(args: argparse.Namespace) -> Settings:
    for name in ("threads", "max_pixels", "queue_size", "max_batch", "max_video_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_upload_mb", "timeout_s", "max_video_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if args.batch_window_ms < 0:
        raise ValueError("--batch-window-ms must be >= 0")
    return Settings(models=list(args.model or []), host=args.host, port=args.port, threads=args.threads,
                    max_pixels=args.max_pixels, max_upload_mb=args.max_upload_mb, queue_size=args.queue_size,
                    timeout_s=args.timeout_s, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
                    max_video_frames=args.max_video_frames, max_video_s=args.max_video_s, device=args.device,
                    demo_image=args.demo_image)


def main(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from .app import create_app
    from .backends import default_model_name, load_backend

    settings = settings_from_args(args)
    torch.set_num_threads(settings.threads)
    if not settings.models:
        settings.models = [default_model_name()]
    backends = {}
    for spec in settings.models:
        backend = load_backend(spec, settings.device)
        if backend.name in backends:
            raise ValueError(f"two models are named {backend.name!r}")
        backends[backend.name] = backend
        print(f"casc serve: loaded {backend.name} ({backend.family}, L={backend.levels}) from {spec}",
              file=sys.stderr, flush=True)
    app = create_app(settings, backends)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            ws_max_size=max(settings.max_upload_bytes, 1 << 16), timeout_graceful_shutdown=
                            int(settings.timeout_s) + 5, lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1

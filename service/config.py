"""Service settings: one dataclass, each field with its help and bounds; ``casc serve`` makes its options from
them (``service/server.py``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
IMAGE_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/bmp",
                       "image/x-ms-bmp", "image/x-bmp"}
WAKE_FACTOR = 4  # default wake limit: 4 x the model's levels L (the QANN is exact at wake = L)
MAX_FRAME_STRIDE = 1000  # the largest video frame stride a request may ask for (every, keyframe_every)
MAX_ASPECT = 20.0  # longest / shortest side; a 1 x 20000 strip is not a photo any detector here can use


def setting(default=None, help: str = "", *, factory=None, least: float | None = None, above: float | None = None,
            flag: str | None = None, **argparse_options):
    """A field of ``Settings`` with what ``casc serve`` makes of it (``service/server.py``): its help, its lower
    bound (``least``: >=, ``above``: >), its option name when not ``--field-name``, and argparse's keywords."""
    metadata = {"help": help, "least": least, "above": above, "flag": flag, "argparse": argparse_options}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Settings:
    models: list[str] = setting(
        factory=list, flag="--model", action="append", metavar="NAME|PATH",
        help="bundled model name or checkpoint path; repeat to serve several (the first is the default); default: the "
             "first QANN entry of weights/manifest.json")
    allow_unverified: bool = setting(False, "serve a checkpoint file whose sha256 matches no manifest entry (trusted "
                                            "files only)", action="store_true")
    analog: str | list[str] | None = setting(
        None, "YOLO11 hybrids: keep attention modules as analog islands ('auto': all of them, or comma-separated "
              "module paths)", metavar="auto|PATHS")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface, e.g. in a container behind its "
                                     "port mapping)")
    port: int = setting(8000, "TCP port")
    threads: int = setting(1, "torch threads (torch.set_num_threads)", least=1)
    max_pixels: int = setting(40_000_000, "image width*height limit (checked from the header, before decoding)",
                              least=1)
    max_upload_mb: float = setting(20.0, "request body limit (413)", above=0)
    max_inflight_mb: float = setting(512.0, "bytes held by all requests together: bodies, decoding, queued images, "
                                                 "and their inference (--budget-inference)", above=0)
    budget_inference: bool = setting(
        True, "count inference memory in --max-inflight-mb: measured per model at start-up, an image's part reserved "
              "with each request, the fixed part once for the model's worker", action=argparse.BooleanOptionalAction)
    max_aspect: float = setting(MAX_ASPECT, "longest/shortest side limit (422)", least=1)
    max_wake: int | None = setting(None, f"wake steps a request may ask for (default: {WAKE_FACTOR} x the model's "
                                         "levels)", least=1, type=int)
    # The service's sleep cap (the library's is detector.options.Schedule.max_sleep). Measured with sleep="auto" on
    # the bundled val images (benchmarks/service.py --sleep-bound): YOLOv8n 2 sleep steps with burst sleep, 20 with
    # burst=1; Faster R-CNN r18 2 and 9 per stage.
    max_sleep: int = setting(32, "sleep steps a request may ask for, and the cap of sleep=auto", least=1)
    max_det: int = setting(1000, "detections a request may ask for", least=1)
    queue_size: int = setting(16, "waiting requests per model (503)", least=1)
    timeout_s: float = setting(30.0, "per-request timeout (504); the model stops within one time step", above=0)
    batch_window_ms: float = setting(5.0, "micro-batching: wait this long for requests to join a batch (0: no "
                                          "waiting)", least=0)
    max_batch: int = setting(8, "images per predict call (1: no batching)", least=1)
    max_video_frames: int = setting(300, "frames decoded from one uploaded video at most", least=1)
    max_video_s: float = setting(120.0, "longest video accepted, in seconds from its header (413)", above=0)
    # below the 512Mi emptyDir that deploy/k8s mounts on /tmp (a pod over its sizeLimit is evicted)
    max_video_disk_mb: float = setting(384.0, "temp-file space of uploaded videos, all requests together (503 when "
                                              "full); keep it below the size of the volume holding the temp dir",
                                       above=0)
    body_timeout_s: float = setting(30.0, "seconds for a request body to arrive (408)", above=0)
    header_timeout_s: float = setting(10.0, "seconds for a request's headers to arrive (the connection is closed)",
                                      above=0)
    keep_alive_s: int = setting(5, "seconds an idle keep-alive connection stays open", least=1)
    limit_concurrency: int = setting(64, "requests and WebSockets in flight at once; more get a JSON 503 with "
                                         "Retry-After at once (/healthz, /readyz and /metrics are never counted nor "
                                         "refused)", least=1)
    ws_idle_s: float = setting(60.0, "seconds a WebSocket may stay silent before it is closed", above=0)
    ws_max_s: float = setting(600.0, "seconds a WebSocket may stay open in all", above=0)
    allowed_origins: list[str] = setting(
        factory=list, flag="--allow-origin", action="append", metavar="ORIGIN",
        help="a browser origin (scheme://host:port) allowed besides this server's own (http://HOST:PORT of --host, or "
             "the loopback names for 127.0.0.1 / 0.0.0.0; the Host header is never trusted); the public name of a "
             "deployment's web page goes here; '*' for any")
    shutdown_delay_s: float = setting(1.0, "after SIGTERM, /readyz answers 503 this long before the listener closes",
                                      least=0)
    device: str = setting("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    engine: str = setting("pytorch", "what runs the spiking networks: the PyTorch simulator, or ONNX Runtime on the "
                                     "exported step graphs (exported on first use into the cache; no spike counts, no "
                                     "/v1/detect/stream)")
    provider: str = setting("cpu", "ONNX Runtime's execution provider: cpu, cuda, tensorrt (--threads sets its "
                                   "threads too)")
    demo_image: str | None = setting(None, "an image served at /demo-image for the web page's Demo button (casc "
                                           "serve's default: a bundled val image, once the bundled benchmark is on "
                                           "disk)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 1024 * 1024)

    @property
    def max_video_disk_bytes(self) -> int:
        return int(self.max_video_disk_mb * 1024 * 1024)

    def wake_limit(self, levels: int) -> int:
        return self.max_wake if self.max_wake is not None else WAKE_FACTOR * int(levels)

    def caps(self, levels: int) -> dict[str, int]:
        """The most a request to a model of ``levels`` may ask for, per run parameter (``detector.options`` declares
        the parameters and their own bounds; these are narrower): enforced by ``service.params.to_params`` and
        stated in the OpenAPI schema."""
        wake = self.wake_limit(levels)
        return {"wake": wake, "burst": wake, "sleep": self.max_sleep, "max_sleep": self.max_sleep,
                "max_det": self.max_det}

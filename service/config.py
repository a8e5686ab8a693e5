"""Service settings (one dataclass; ``casc serve`` fills it from the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
IMAGE_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/bmp",
                       "image/x-ms-bmp", "image/x-bmp"}
WAKE_FACTOR = 4  # default wake limit: 4 x the model's levels L (the QANN is exact at wake = L)
# Default sleep limit. Measured with sleep="auto" on the bundled val images (benchmarks/service.py
# --sleep-bound): YOLOv8n 2 sleep steps with burst sleep, 20 with burst=1; Faster R-CNN r18 2 and 9 per stage.
MAX_SLEEP = 32
MAX_DET = 1000  # detections a request may ask for
MAX_ASPECT = 20.0  # longest / shortest side; a 1 x 20000 strip is not a photo any detector here can use


@dataclass
class Settings:
    models: list[str] = field(default_factory=list)  # names or checkpoint paths; first is the default
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 1  # torch intra-op threads (torch.set_num_threads)
    max_pixels: int = 40_000_000  # width*height limit, checked from the header before decoding
    max_upload_mb: float = 20.0
    max_inflight_mb: float = 512.0  # bodies + decoding + queued images, all requests together
    max_aspect: float = MAX_ASPECT
    max_wake: int | None = None  # per request; None: WAKE_FACTOR x the model's levels
    max_sleep: int = MAX_SLEEP  # per request: a fixed sleep, and the cap of sleep="auto"
    max_det: int = MAX_DET  # per request
    queue_size: int = 16  # per model worker
    timeout_s: float = 30.0  # per request (504)
    batch_window_ms: float = 5.0  # micro-batching window
    max_batch: int = 8
    max_video_frames: int = 300  # frames decoded from one uploaded video
    max_video_s: float = 120.0  # video duration limit (from its header)
    # temp files of uploaded videos, all requests together; below the 512Mi emptyDir that deploy/k8s mounts on
    # /tmp (a pod over its sizeLimit is evicted)
    max_video_disk_mb: float = 384.0
    device: str = "cpu"
    demo_image: str | None = None  # served at GET /demo-image (the web page's demo)
    allow_unverified: bool = False  # serve checkpoint files that match no manifest entry
    analog: str | list[str] | None = None  # YOLO11 hybrids: "auto" or module paths kept analog
    engine: str = "pytorch"  # what runs the spiking networks: pytorch or onnxruntime (no spike counts)
    provider: str = "cpu"  # ONNX Runtime's execution provider: cpu, cuda, tensorrt
    # connections
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (408)
    header_timeout_s: float = 10.0  # request line + headers must arrive within this (connection closed)
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this
    limit_concurrency: int = 64  # requests + WebSockets in flight (probes excepted); more get a JSON 503
    ws_idle_s: float = 60.0  # a WebSocket with no message for this long is closed
    ws_max_s: float = 600.0  # a WebSocket is closed after this long in all
    allowed_origins: list[str] = field(default_factory=list)  # browser Origins allowed besides own_origins()
    shutdown_delay_s: float = 1.0  # after SIGTERM: /readyz says 503 this long before the listener closes

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

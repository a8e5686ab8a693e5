"""Service settings (one dataclass; ``casc serve`` fills it from the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
IMAGE_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/bmp",
                       "image/x-ms-bmp", "image/x-bmp"}
MAX_WAKE = 64
MAX_SLEEP = 256


@dataclass
class Settings:
    models: list[str] = field(default_factory=list)  # names or checkpoint paths; first is the default
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 1  # torch intra-op threads (torch.set_num_threads)
    max_pixels: int = 40_000_000  # width*height limit, checked from the header before decoding
    max_upload_mb: float = 20.0
    queue_size: int = 16  # per model worker
    timeout_s: float = 30.0  # per request (504)
    batch_window_ms: float = 5.0  # micro-batching window
    max_batch: int = 8
    max_video_frames: int = 300  # frames decoded from one uploaded video
    max_video_s: float = 120.0  # video duration limit (from its header)
    device: str = "cpu"
    demo_image: str | None = None  # served at GET /demo-image (the web page's demo)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

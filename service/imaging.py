"""Uploaded images -> the model's input: format allow-list, pixel limit from the header, decoding straight to the
size the model resizes to (``detector.images``), shape checks."""

from __future__ import annotations

import numpy as np
from PIL import Image

from detector import images
from detector.images import Decoded

from .config import SUPPORTED_FORMATS
from .errors import ServiceError
from .memory import release_freed

LARGE_DECODE_PIXELS = 4_000_000  # after decoding more than this, give the freed buffers back to the OS


def set_pixel_limit(max_pixels: int) -> None:
    """PIL's own bomb guard as a second line: it raises above 2x its limit, we check ``max_pixels`` first."""
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)


def _too_large(max_pixels: int) -> ServiceError:
    """The reply to an image over Pillow's guard (the library's text stays out of it)."""
    return ServiceError(413, "image_too_large", f"the image header declares more than {max_pixels} pixels, the limit")


def header_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) as displayed, from the header only; a JPEG whose scans are too short for the size its
    header declares (decoders would fill the rest with gray) is refused here."""
    try:
        with images.open_image(data, SUPPORTED_FORMATS) as image:
            size = images.displayed_size(image)
    except images.ImageTooLarge:
        raise _too_large(max_pixels) from None
    except images.ImageError:
        raise ServiceError(415, "unsupported_image",
                           "not a JPEG, PNG, WebP or BMP image (or the header is corrupt)") from None
    if not images.jpeg_scan_complete(data):
        raise ServiceError(422, "bad_image", f"the JPEG header declares {size[0]}x{size[1]} pixels but its data is "
                                             "far too short for that (truncated or forged)")
    return size


def working_bytes(data: bytes, size: tuple[int, int], backend) -> int:
    """The bytes decoding ``data`` for ``backend`` holds at its peak (``detector.images.working_bytes``: bit depth,
    bands, JPEG scale and the conversion's largest intermediates), reserved from the budget while it runs."""
    with images.open_image(data, SUPPORTED_FORMATS) as image:
        return images.working_bytes(image, images.fit_size(size, backend.fit(size)))


def check_shape(size: tuple[int, int], backend, max_pixels: int, max_aspect: float) -> None:
    """Refuse, before decoding, an image the model cannot take (so it never joins, or breaks, a batch)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ServiceError(422, "bad_image", f"image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ServiceError(413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if max(w, h) / min(w, h) > max_aspect:
        raise ServiceError(422, "bad_image_shape", f"image is {w}x{h}: the aspect ratio is over {max_aspect:g}:1")
    if min(backend.input_size(backend.fit(size))) < 1:
        raise ServiceError(422, "bad_image_shape", f"image is {w}x{h}: too thin for model {backend.name!r}")


def decode_for(data: bytes, backend, max_pixels: int) -> Decoded:
    """Decode ``data`` straight to the size ``backend`` resizes it to (JPEG: at a reduced DCT scale)."""
    try:
        decoded = images.decode(data, fit=backend.fit, formats=SUPPORTED_FORMATS)
        if decoded.size[0] * decoded.size[1] > LARGE_DECODE_PIXELS:
            release_freed()
        return decoded
    except images.ImageTooLarge:
        raise _too_large(max_pixels) from None
    except images.CorruptImage:
        raise ServiceError(422, "bad_image", "cannot decode the image (truncated or corrupt data)") from None
    except images.ImageError:
        raise ServiceError(415, "unsupported_image",
                           "not a JPEG, PNG, WebP or BMP image (or the header is corrupt)") from None


def fit_frame(frame_rgb: np.ndarray, backend) -> tuple[np.ndarray, tuple[float, float]]:
    """A decoded video frame resized to the model's input size; (array, scale back to the frame's pixels)."""
    import cv2

    h, w = frame_rgb.shape[:2]
    tw, th = images.fit_size((w, h), backend.fit((w, h)))
    if (tw, th) == (w, h):
        return frame_rgb, (1.0, 1.0)
    return cv2.resize(frame_rgb, (tw, th), interpolation=cv2.INTER_AREA), (w / tw, h / th)

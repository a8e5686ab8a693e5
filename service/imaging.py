"""Decoding uploaded images safely: format allow-list, pixel limit checked from the header, truncation."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from .config import SUPPORTED_FORMATS
from .errors import ServiceError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-gray image


def _pil_open():
    """Pillow's own ``Image.open``: Ultralytics monkey-patches it to install pi-heif on an unknown file, which a
    server must never do on user input. The patch keeps the original as ``_image_open`` in its module."""
    fn = Image.open
    for _ in range(4):
        if getattr(fn, "__module__", None) == "PIL.Image":
            return fn
        fn = getattr(fn, "__globals__", {}).get("_image_open")
        if fn is None:
            break
    return Image.open


def set_pixel_limit(max_pixels: int) -> None:
    """PIL's own bomb guard as a second line: it raises above 2x its limit, we check ``max_pixels`` first."""
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """``data`` (JPEG, PNG, WebP or BMP bytes) -> HxWx3 uint8 RGB. Raises ``ServiceError`` (4xx)."""
    if not data:
        raise ServiceError(400, "empty_body", "no image data received")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _pil_open()(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ServiceError(413, "image_too_large", f"image exceeds the pixel limit ({error})") from None
    except Exception:  # UnidentifiedImageError, OSError, ...: not an image we accept
        raise ServiceError(415, "unsupported_image",
                           "not a JPEG, PNG, WebP or BMP image (or the header is corrupt)") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ServiceError(422, "bad_image", f"image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ServiceError(413, "image_too_large",
                               f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                rgb = image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ServiceError(413, "image_too_large", str(error)) from None
        except Exception as error:  # truncated / corrupt data
            raise ServiceError(422, "bad_image", f"cannot decode the {image.format} image: {error}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ServiceError(422, "bad_image", f"decoded image has shape {array.shape}")
    return np.ascontiguousarray(array)

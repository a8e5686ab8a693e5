"""The one image reader of the project (library, datasets and service): any file Pillow reads -> HxWx3 uint8 RGB.

What a camera or an editor writes is normalised the same way everywhere:
  * EXIF orientation is applied (a phone photo comes out upright, its size as displayed);
  * 16-bit samples are scaled to 8 bits (65535 -> 255), never clipped (clipping turns a 16-bit image white);
  * transparency is composited on a fixed gray (``BACKGROUND``, the letterbox padding of YOLO);
  * CMYK, palette, gray, and other modes become RGB.

``decode`` can also shrink the image while decoding (``fit``): JPEGs then decode at a reduced DCT scale
(Pillow's draft mode) and only the resized array is kept. WebPs are decoded by OpenCV's libwebp straight into one
array: Pillow's WebP reader holds about 15 bytes a pixel at once (libwebp's animation canvases, a bytes copy and
its own image), OpenCV's at most 8. Errors are ``ImageError`` subclasses that say
what was wrong: ``UnsupportedImage`` (not an image of an allowed format), ``ImageTooLarge`` (over the
pixel limit, checked from the header before decoding), ``CorruptImage`` (truncated or broken data); a missing file is a ``FileNotFoundError``.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = [  # the public API (apps import only these)
    "ImageError", "UnsupportedImage", "ImageTooLarge", "CorruptImage", "Decoded", "open_image", "decode",
    "read_image", "read_size", "from_pil", "fit_size", "displayed_size", "working_bytes", "jpeg_scan_complete",
]

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-gray image
BACKGROUND = (114, 114, 114)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image
STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # the rest: 4 a pixel
T = Image.Transpose
TRANSPOSES = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
              7: T.TRANSVERSE, 8: T.ROTATE_90}  # EXIF orientation -> the transpose that shows the image upright
STRIP_PIXELS = 1 << 18  # 16-bit images are scaled to 8 bits this many pixels at a time (2 MB as int64)
COMPOSITE_PIXELS = 1 << 16  # WebP alpha is composited this many pixels at a time (its temporaries: 16 bytes each)
WEBP_BYTES = 8  # a pixel, decoding a WebP with OpenCV: libwebp's ARGB buffer (lossless) and the BGR(A) output


class ImageError(ValueError):
    """An image could not be read; the message says why."""


class UnsupportedImage(ImageError):
    """Not an image in one of the accepted formats."""


class ImageTooLarge(ImageError):
    """Width x height over the pixel limit (from the header; nothing decoded)."""


class CorruptImage(ImageError):
    """The header is readable but the pixel data is broken or truncated."""


@dataclass
class Decoded:
    """``array``: HxWx3 uint8 RGB (resized when ``fit`` asked for it); ``size``: (width, height) of the image
    as displayed (EXIF orientation applied) before any resizing; ``format``: Pillow's format name."""

    array: np.ndarray
    size: tuple[int, int]
    format: str

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from ``array`` pixels back to the original image's pixels."""
        return self.size[0] / self.array.shape[1], self.size[1] / self.array.shape[0]


def _pil_open() -> Callable:
    """Pillow's own ``Image.open``: Ultralytics monkey-patches it to install pi-heif on an unknown file, which
    must never happen on user input. The patch keeps the original as ``_image_open`` in its module."""
    fn = Image.open
    for _ in range(4):
        if getattr(fn, "__module__", None) == "PIL.Image":
            return fn
        fn = getattr(fn, "__globals__", {}).get("_image_open")
        if fn is None:
            break
    return Image.open


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: show the stored pixels
        return 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    w, h = image.size
    return (h, w) if _orientation(image) in SWAPS_AXES else (w, h)


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit gray image as 8-bit "L", 65535 -> 255, in strips of rows: no full-size intermediate array beyond
    the 1-byte result (the 16-bit image would otherwise be copied to float64, 8 bytes a pixel, several times)."""
    w, h = image.size
    gray = np.empty((h, w), np.uint8)
    rows = max(1, STRIP_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        strip = np.asarray(image.crop((0, top, w, min(h, top + rows))), dtype=np.int64)
        np.clip(strip, 0, 65535, out=strip)  # in place: one int64 strip at a time
        strip += 128
        strip //= 257  # (x + 128) // 257 = rint(x / 257): 257 is odd
        gray[top:top + strip.shape[0]] = strip
    return Image.fromarray(gray, "L")


def working_bytes(image: Image.Image, target: tuple[int, int]) -> int:
    """The most bytes ``decode`` holds at once for ``image`` (header read) decoded to ``target`` (w, h): Pillow's
    decoded image at its stored bytes a pixel (a JPEG at its reduced DCT scale), the oriented copy, the
    conversion's intermediates (16-bit: the 8-bit copy; alpha: RGBA and RGB), Pillow's resizing intermediates,
    the resized RGB and the returned array. What a caller reserves before decoding an image of unknown
    provenance."""
    w, h = image.size
    if image.format == "JPEG" and target != displayed_size(image):
        tw, th = (target[1], target[0]) if _orientation(image) in SWAPS_AXES else target
        ratio = min(w // max(tw, 1), h // max(th, 1))
        reduction = next(r for r in (8, 4, 2, 1) if ratio >= r)  # what draft() chooses
        w, h = -(-w // reduction), -(-h // reduction)
    stored = STORED_BYTES.get(image.mode, 4)
    oriented = stored if _orientation(image) != 1 else 0
    strips, resizing = 0, 0
    if image.format == "WEBP":  # compositing alpha holds BGRA + BGR, 7 bytes a pixel, after the ARGB buffer went
        per_pixel = WEBP_BYTES
    elif image.mode in SIXTEEN_BIT_MODES:
        per_pixel = stored + 2  # the 8-bit copy and its oriented copy (orientation is applied after)
        strips = min(w * h, STRIP_PIXELS) * (8 + 8)  # one strip as int64, and as cropped (mode "I": 4 + 4)
        resizing = _resizing_bytes((w, h), target, _orientation(image) in SWAPS_AXES, 1)  # "L"
    elif image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        per_pixel = stored + oriented + (0 if image.mode == "RGBA" else 4) + 4
    else:
        per_pixel = stored + oriented + (0 if image.mode == "RGB" else 4)
    if image.format != "WEBP" and image.mode not in SIXTEEN_BIT_MODES:
        resizing = _resizing_bytes((w, h), target, _orientation(image) in SWAPS_AXES, 4)  # "RGB": 4 bytes a pixel
    return w * h * (per_pixel + 1) + target[0] * target[1] * 7 + strips + resizing  # + 1: the decoder's buffers


def _resizing_bytes(stored: tuple[int, int], target: tuple[int, int], swapped: bool, pixel_bytes: int) -> int:
    """What Pillow's ``resize(target, reducing_gap=2.0)`` of the oriented image holds besides its result: the
    ``reduce()``d copy (by whole factors down to at least twice the target) and its first, horizontal pass."""
    w, h = (stored[1], stored[0]) if swapped else stored
    if (w, h) == target:
        return 0
    fx, fy = max(1, int(w / target[0] / 2)), max(1, int(h / target[1] / 2))
    reduced = _ceil(w, fx) * _ceil(h, fy) if fx > 1 or fy > 1 else 0
    return (reduced + target[0] * _ceil(h, fy)) * pixel_bytes


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit scaled, alpha composited on ``BACKGROUND``, the rest converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        return _eight_bit(image).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, BACKGROUND)
        rgb.paste(rgba, (0, 0), rgba)  # blended by its alpha in place: no full-size RGBA background or composite
        return rgb
    return image if image.mode == "RGB" else image.convert("RGB")


SOF_HUFFMAN_DCT = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive: each coded block costs at least one bit
NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: markers without a length field


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def jpeg_scan_complete(data: bytes) -> bool:
    """False when a Huffman-coded JPEG's scans hold fewer bits than its frame header's blocks need (one bit per
    8x8 block at the very least): a header claiming, say, 6000 x 6000 over a small scan, which decoders fill with
    gray. True for anything else (other formats, arithmetic coding, unparsable files: the decoder judges those)."""
    if data[:2] != b"\xff\xd8":
        return True
    blocks, scan_bytes, i = 0, 0, 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return True  # not where a marker should be: left to the decoder
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            break
        if marker in NO_LENGTH:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i + 4:i + 2 + length]
        if marker in SOF_HUFFMAN_DCT and len(segment) >= 6:
            height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
            factors = [(segment[6 + 3 * c + 1] >> 4, segment[6 + 3 * c + 1] & 15) for c in range(count)
                       if 6 + 3 * c + 1 < len(segment)]
            hmax, vmax = max((f[0] for f in factors), default=1) or 1, max((f[1] for f in factors), default=1) or 1
            blocks = sum(_ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8) for h, v in factors)
        i += 2 + length
        if marker == 0xDA:  # entropy-coded data up to the next marker that is neither a stuffed 0xFF nor RSTn
            start = i
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= len(data):
                    i = len(data)
                    break
                if data[i + 1] == 0x00 or 0xD0 <= data[i + 1] <= 0xD7:
                    i += 2
                    continue
                break
            scan_bytes += i - start
    return scan_bytes * 8 >= blocks


def fit_size(size: tuple[int, int], fit: tuple[int, int]) -> tuple[int, int]:
    """``size`` (w, h) shrunk, aspect kept, to fit inside ``fit`` (w, h); never enlarged; sides at least 1."""
    w, h = size
    scale = min(fit[0] / w, fit[1] / h, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def open_image(source, formats: Iterable[str] | None = None) -> Image.Image:
    """The Pillow image of ``source`` (path or bytes), header read, nothing decoded; ``ImageError`` if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                return _pil_open()(io.BytesIO(bytes(source)), formats=list(formats) if formats else None)
            return _pil_open()(os.fspath(source), formats=list(formats) if formats else None)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {source}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(f"image exceeds Pillow's pixel limit ({error})") from None
    except Exception as error:  # UnidentifiedImageError, OSError, SyntaxError from a broken header, ...
        allowed = f" (accepted: {', '.join(formats)})" if formats else ""
        raise UnsupportedImage(f"not a readable image{allowed}: {type(error).__name__}") from None


def decode(source, *, fit: tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]] | None = None,
           max_pixels: int | None = None, formats: Iterable[str] | None = None) -> Decoded:
    """Read ``source`` (a path or the encoded bytes). ``fit``: a (w, h) box, or a function of the displayed
    (w, h) giving one, to shrink the image into while decoding. ``max_pixels``: limit on width x height,
    checked before any pixel is decoded. ``formats``: Pillow format names to accept (default: any)."""
    if isinstance(source, (bytes, bytearray, memoryview)) and not source:
        raise UnsupportedImage("no image data")
    with open_image(source, formats) as image:
        w, h = displayed_size(image)
        if w <= 0 or h <= 0:
            raise CorruptImage(f"the image has an empty size {w}x{h}")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        box = fit((w, h)) if callable(fit) else fit
        target = fit_size((w, h), box) if box else (w, h)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                rgb = _decode_webp(_bytes_of(source), image, target) if image.format == "WEBP" else \
                    _decode_pixels(image, target)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageTooLarge(str(error)) from None
        except Exception as error:  # truncated / corrupt data
            raise CorruptImage(f"cannot decode the {image.format} image: {error}") from None
        fmt = str(image.format)
    array = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    return Decoded(array=array, size=(w, h), format=fmt)


def _decode_pixels(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Decode (a JPEG at the smallest DCT scale still >= ``target``), orient, convert to RGB, resize."""
    orientation = _orientation(image)
    if target != displayed_size(image) and image.format == "JPEG":
        stored = (target[1], target[0]) if orientation in SWAPS_AXES else target
        image.draft(image.mode, stored)  # decodes at 1/2, 1/4 or 1/8 scale where that is still large enough
    image.load()
    if image.mode in SIXTEEN_BIT_MODES:  # to 8 bits first: orienting and resizing then move 1 byte a pixel
        gray = _eight_bit(image)
        oriented = gray.transpose(TRANSPOSES[orientation]) if orientation in TRANSPOSES else gray
        if oriented.size != target:
            oriented = oriented.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return oriented.convert("RGB")
    oriented = ImageOps.exif_transpose(image) if orientation != 1 else image
    rgb = _to_rgb(oriented)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return rgb


def _bytes_of(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(os.fspath(source), "rb") as f:
        return f.read()


def _decode_webp(data: bytes, image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """A WebP (header read by Pillow as ``image``) decoded by OpenCV into one BGR(A) array, alpha composited on
    ``BACKGROUND`` in strips, resized (area average), then oriented: the orientation is applied to the small
    image, so the target is first taken back to the stored axes."""
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # UNCHANGED: EXIF not applied
    if pixels is None or pixels.ndim != 3 or (pixels.shape[1], pixels.shape[0]) != image.size:
        raise CorruptImage("the WebP data does not decode to the size its header declares")
    if pixels.shape[2] == 4:
        pixels = _composited(pixels)
    orientation = _orientation(image)
    stored = (target[1], target[0]) if orientation in SWAPS_AXES else target
    if stored != image.size:
        pixels = cv2.resize(pixels, stored, interpolation=cv2.INTER_AREA)
    rgb = Image.fromarray(np.ascontiguousarray(pixels[..., 2::-1]), "RGB")
    return rgb.transpose(TRANSPOSES[orientation]) if orientation in TRANSPOSES else rgb


def _composited(bgra: np.ndarray) -> np.ndarray:
    """BGRA over ``BACKGROUND`` -> BGR, rint(c a / 255 + b (255 - a) / 255), a strip of rows at a time."""
    h, w = bgra.shape[:2]
    bgr = np.empty((h, w, 3), np.uint8)
    background = np.array(BACKGROUND[::-1], np.uint32)
    rows = max(1, COMPOSITE_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        strip = bgra[top:top + rows].astype(np.uint32)
        alpha = strip[..., 3:]
        bgr[top:top + rows] = (strip[..., :3] * alpha + background * (255 - alpha) + 127) // 255
    return bgr


def from_pil(image: Image.Image) -> np.ndarray:
    """An already opened Pillow image, normalised as ``decode`` does: HxWx3 uint8 RGB."""
    oriented = ImageOps.exif_transpose(image) if _orientation(image) != 1 else image
    return np.ascontiguousarray(np.asarray(_to_rgb(oriented), dtype=np.uint8))


def read_image(source, **kwargs) -> np.ndarray:
    """``decode(source, **kwargs).array``: HxWx3 uint8 RGB."""
    return decode(source, **kwargs).array


def read_size(source) -> tuple[int, int]:
    """(width, height) as displayed, from the header (nothing decoded)."""
    with open_image(source) as image:
        return displayed_size(image)

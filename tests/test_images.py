"""The one image reader (detector.images) on generated fixtures: EXIF orientation, 16-bit, alpha, CMYK, palette,
JPEG draft decoding, limits and errors; and that the adapters and the dataset loader use it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from detector import images
from detector.images import BACKGROUND, CorruptImage, ImageTooLarge, UnsupportedImage, decode, read_image


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 40x20 (w x h) stored image whose left half is red, with an EXIF orientation tag."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif), stored


def test_exif_orientation_applied():
    data, _ = exif_rotated_jpeg(6)  # 6: rotate 90 degrees clockwise to display
    out = decode(data)
    assert out.size == (20, 40) and out.array.shape == (40, 20, 3)  # displayed: portrait
    top, bottom = out.array[:15].mean(axis=(0, 1)), out.array[-15:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 60  # the stored left (red) half is now on top
    assert images.read_size(data) == (20, 40)


def test_sixteen_bit_gray_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    array = read_image(encoded(Image.fromarray(ramp), "PNG"))
    assert array.shape == (8, 64, 3) and array.dtype == np.uint8
    assert array[0, 0, 0] == 0 and array[-1, -1, 0] == 255
    assert abs(int(array[4, 32, 0]) - round(int(ramp[4, 32]) / 257)) <= 1  # mid-gray stays mid-gray


def test_sixteen_bit_exact_in_strips_and_oriented():
    """8 bits = rint(x / 257) exactly, across strip borders, and an EXIF orientation applied after scaling."""
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 65536, (images.STRIP_PIXELS // 100 + 7, 100), dtype=np.uint16)  # two strips
    image = Image.fromarray(samples)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown turned 90 degrees clockwise
    array = read_image(encoded(image, "PNG", exif=exif))
    expected = np.rint(samples / 257.0).astype(np.uint8)
    assert np.array_equal(array[..., 0], np.rot90(expected, -1)) and (array[..., 0] == array[..., 2]).all()


RSS_PROBE = """
import sys
from pathlib import Path
from detector import images

def kib(field):
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))

data = Path(sys.argv[1]).read_bytes()
images.decode(Path(sys.argv[2]).read_bytes(), fit=(64, 64))
with images.open_image(data) as header:
    budget = images.working_bytes(header, images.fit_size(header.size, (640, 640)))
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the RSS now
before = kib("VmRSS")
images.decode(data, fit=(640, 640))
print((kib("VmHWM") - before) * 1024, budget)
"""
PROBED = {"gray16": lambda side: Image.fromarray(np.full((side, side), 40000, np.uint16)),
          "rgba": lambda side: Image.new("RGBA", (side, side), (10, 20, 30, 128)),
          "palette": lambda side: Image.new("P", (side, side), 3), "rgb": lambda side: Image.new("RGB", (side, side), 7),
          "webp": lambda side: Image.new("RGB", (side, side), 7),
          "webp_rgba": lambda side: Image.new("RGBA", (side, side), (10, 20, 30, 128))}


@pytest.mark.parametrize("kind", list(PROBED))
def test_decoding_holds_at_most_its_working_bytes(kind, tmp_path):
    """The peak RSS that decoding a 3000 x 3000 image adds stays within ``working_bytes`` (what the service
    reserves); a 16-bit image no longer goes through full-size float64 copies (8 bytes a pixel, several times),
    a lossless WebP no longer through Pillow's reader (about 15 bytes a pixel at once). The file is encoded here,
    so the probe's peak RSS is its decoding's alone."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    fmt, options = ("WEBP", {"lossless": True}) if kind.startswith("webp") else ("PNG", {})
    (tmp_path / "image").write_bytes(encoded(PROBED[kind](3000), fmt, **options))
    (tmp_path / "warm").write_bytes(encoded(PROBED[kind](64), fmt, **options))  # imports and first-call buffers
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "image"), str(tmp_path / "warm")],
                         cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    grown, budget = map(int, out.stdout.split())
    assert grown <= budget, f"{kind}: decoding grew RSS by {grown >> 20} MB, over its {budget >> 20} MB budget"
    if kind == "gray16":  # 2 bytes a pixel stored, 1 for the 8-bit copy: far from float64's 8 (and its copies)
        assert grown <= 3000 * 3000 * 4 and budget <= 3000 * 3000 * 8, (grown, budget)
    if kind.startswith("webp"):
        assert budget <= 3000 * 3000 * 10, (grown, budget)


def webp_reference(data: bytes) -> np.ndarray:
    """What Pillow's own reader makes of a WebP, normalised as ``decode`` promises (oriented, on BACKGROUND)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND + (255,)), image)
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("lossless", [True, False])
def test_webp_decodes_as_pillow_reads_it(mode, lossless, tmp_path):
    """WebPs go through OpenCV's decoder: the same pixels as Pillow's reader, alpha on the same background,
    EXIF orientation applied, from bytes or a path, and resized to the fitted size."""
    ramp = np.add.outer(np.arange(120), np.arange(200)).clip(0, 255).astype(np.uint8)
    planes = [ramp, 255 - ramp, ramp // 2] + ([np.broadcast_to(np.arange(200, dtype=np.uint8), (120, 200))]
                                              if mode == "RGBA" else [])
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    data = encoded(Image.fromarray(np.stack(planes, -1), mode), "WEBP", lossless=lossless, quality=90, exif=exif)
    out = decode(data)
    assert out.size == (120, 200) and np.array_equal(out.array, webp_reference(data))
    (tmp_path / "image.webp").write_bytes(data)
    assert np.array_equal(read_image(tmp_path / "image.webp"), out.array)
    small = decode(data, fit=(50, 50))
    assert small.size == (120, 200) and small.array.shape == (50, 30, 3)
    reference = np.asarray(Image.fromarray(webp_reference(data)).resize((30, 50), Image.Resampling.BOX))
    assert np.abs(small.array.astype(int) - reference).mean() < 2


def test_alpha_composited_on_fixed_background():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (0, 0, 255, 255)  # left half opaque blue, right half fully transparent
    array = read_image(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(array[0, 0]) == (0, 0, 255) and tuple(array[0, 9]) == BACKGROUND


def test_cmyk_and_palette_and_gray_become_rgb():
    cmyk = Image.new("CMYK", (12, 6), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    array = read_image(encoded(cmyk, "JPEG", quality=95))
    assert array.shape == (6, 12, 3) and array[3, 6, 0] > 200 and array[3, 6, 1] < 60
    palette = Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 255  # an unused index: nothing transparent
    assert tuple(read_image(encoded(palette, "PNG"))[0, 0]) == (10, 200, 30)
    transparent = Image.new("P", (4, 4), 0)
    transparent.putpalette([255, 255, 255] * 256)
    assert tuple(read_image(encoded(transparent, "PNG", transparency=0))[0, 0]) == BACKGROUND
    gray = read_image(encoded(Image.new("L", (5, 3), 77), "PNG"))
    assert gray.shape == (3, 5, 3) and (gray == 77).all()


def test_fit_decodes_jpeg_small_and_keeps_the_original_size():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    out = decode(encoded(big, "JPEG"), fit=(256, 256))
    assert out.size == (1600, 1200) and out.array.shape == (192, 256, 3)
    assert out.scale == (1600 / 256, 1200 / 192)
    small = decode(encoded(Image.new("RGB", (40, 30)), "PNG"), fit=(256, 256))
    assert small.array.shape == (30, 40, 3)  # never enlarged


def test_limits_and_errors():
    png = encoded(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLarge, match="10000 pixels"):
        decode(png, max_pixels=9999)
    with pytest.raises(UnsupportedImage):
        decode(b"not an image at all")
    with pytest.raises(UnsupportedImage):
        decode(png, formats=["JPEG"])
    with pytest.raises(UnsupportedImage):
        decode(b"")
    with pytest.raises(CorruptImage):
        noisy = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        jpeg = encoded(Image.fromarray(noisy), "JPEG")
        decode(jpeg[: len(jpeg) // 2])
    with pytest.raises(FileNotFoundError):
        read_image("/nonexistent/x.png")


def test_library_readers_use_it(tmp_path):
    """The detectors (both families) and the dataset loader all read files through detector.images."""
    from detector.data.dataset import read_image as dataset_read, read_image_size
    from detector.detect import read_bgr

    data, _ = exif_rotated_jpeg(6)
    path = tmp_path / "phone.jpg"
    path.write_bytes(data)
    expected = read_image(path)
    assert (dataset_read(str(path)) == expected).all() and read_image_size(str(path)) == (40, 20)
    assert (read_bgr(path, "bgr")[..., ::-1] == expected).all()  # both adapters' reader (SpikingDetector)
    assert (read_bgr(Image.open(path), "bgr")[..., ::-1] == expected).all()
    sixteen = tmp_path / "depth.png"
    sixteen.write_bytes(encoded(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG"))
    assert (read_bgr(sixteen, "bgr") == 255).all()


def test_jpeg_scans_too_short_for_their_header_are_found():
    import struct

    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    for options in ({}, {"progressive": True}, {"subsampling": 0}):
        good = encoded(photo, "JPEG", **options)
        assert images.jpeg_scan_complete(good), options
        sof = good.find(b"\xff\xc2" if options.get("progressive") else b"\xff\xc0")
        forged = good[:sof + 5] + struct.pack(">HH", 6000, 6000) + good[sof + 9:]  # the header claims 6000 x 6000
        assert not images.jpeg_scan_complete(forged), options
    flat = encoded(Image.new("L", (4000, 4000), 128), "JPEG")  # a legitimately tiny scan: one bit a block, at least
    assert images.jpeg_scan_complete(flat) and images.jpeg_scan_complete(encoded(photo, "PNG"))

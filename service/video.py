"""Uploaded videos, safely: only real containers (recognised by their signature), opened by FFmpeg with that one
demuxer and no protocol but the local file, under a name the server picks.

FFmpeg left to guess would also read an HLS playlist or an ffconcat list, which name other files, and even
URLs: an upload could make the server decode a video already on its disk. Here such files are refused before
FFmpeg sees them, and if one slipped through, the demuxer is fixed and ``protocol_whitelist`` is ``file``.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading

from .config import Settings
from .errors import ServiceError

# container -> (FFmpeg demuxer, temp-file suffix)
CONTAINERS = {"mp4": ("mov", ".mp4"), "avi": ("avi", ".avi"), "matroska": ("matroska", ".mkv")}
MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"}  # first box of MP4 / QuickTime files
_OPEN_LOCK = threading.Lock()  # OpenCV reads its FFmpeg options from the environment at open time
OPEN_TIMEOUT_MS = 10_000


def container_of(data: bytes) -> str:
    """``"mp4"``, ``"avi"`` or ``"matroska"`` from the file's signature; anything else is a 415."""
    if len(data) >= 12 and data[4:8] in MP4_BOXES:
        return "mp4"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    raise ServiceError(415, "unsupported_video", "not an MP4/MOV, AVI or Matroska/WebM video (playlists, "
                                                 "concat lists and images are not accepted)")


def save_upload(data: bytes, container: str) -> str:
    """The upload in a new temp file whose name the server picks (the client's file name is never used)."""
    fd, path = tempfile.mkstemp(prefix="casc-video-", suffix=CONTAINERS[container][1])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _capture(path: str, container: str):
    import cv2

    options = f"input_format;{CONTAINERS[container][0]}|protocol_whitelist;file"
    with _OPEN_LOCK:
        saved = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = options
        try:
            return cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                                                           cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS])
        finally:
            if saved is None:
                os.environ.pop("OPENCV_FFMPEG_CAPTURE_OPTIONS", None)
            else:
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = saved


def read_frame(capture):
    ok, frame = capture.read()
    return frame if ok and frame is not None and frame.ndim == 3 else None


def open_video(path: str, container: str, settings: Settings):
    """(capture, info) with ``info``: fps, width, height and the first frame (BGR); limits checked."""
    import cv2

    capture = _capture(path, container)
    if not capture.isOpened():
        capture.release()
        raise ServiceError(422, "bad_video", "cannot open the video (corrupt or unsupported codec)")
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        count = float(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        fps = fps if math.isfinite(fps) and 0 < fps < 1000 else 0.0
        if fps > 0 and math.isfinite(count) and count / fps > settings.max_video_s:
            raise ServiceError(413, "video_too_long",
                               f"video lasts {count / fps:.1f} s; the limit is {settings.max_video_s} s")
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > settings.max_pixels:
            raise ServiceError(413, "image_too_large", f"video frames are {width}x{height}; over the pixel limit")
        first = read_frame(capture)
        if first is None:
            raise ServiceError(422, "bad_video", "the video has no decodable frame")
        if first.shape[0] * first.shape[1] > settings.max_pixels:
            raise ServiceError(413, "image_too_large", "video frames are over the pixel limit")
    except BaseException:
        capture.release()
        raise
    return capture, {"fps": fps, "width": int(first.shape[1]), "height": int(first.shape[0]), "first": first}

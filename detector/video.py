"""Frames of a video (a file, a webcam, a stream, or frames given one by one) for ``SpikingDetector.predict_video``
and ``casc predict``. Standard library only at import time (OpenCV is imported when a video is opened), so the
command line can use it without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

__all__ = [  # the public API (apps import only these)
    "KEYFRAME_EVERY", "VIDEO_SUFFIXES", "UnreadableVideo", "video_frames", "frames_of",
]

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
# predict_video's default keyframe interval. In float32 a boundary flip made in a static region persists across
# delta frames; over 300 frames (benchmarks/video.py) a keyframe every 16 frames keeps as many frames equal to the
# QANN as fresh runs do (64 and never: fewer, see the README's video section).
KEYFRAME_EVERY = 16


class UnreadableVideo(ValueError):
    """A video, webcam or stream OpenCV cannot open."""


def video_frames(source: str | Path, stride: int = 1) -> Iterator[tuple[int, int, float, object]]:
    """(frame index from 1, frame count (0 for a live stream), fps, BGR frame) of every ``stride``-th frame OpenCV
    decodes from a video file, a webcam index (``"0"``) or a stream URL."""
    import cv2

    capture = cv2.VideoCapture(int(source) if isinstance(source, str) and source.isdigit() else str(source))
    if not capture.isOpened():
        raise UnreadableVideo("cannot open the video (not a video file, or a codec OpenCV lacks)"
                              if isinstance(source, Path) else
                              "cannot open the webcam or stream (is it connected, is the URL right?)")
    try:
        total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            index += 1
            if (index - 1) % stride == 0:
                yield index, total, fps / stride, frame
    finally:
        capture.release()


def frames_of(source) -> tuple[Iterator, str | None]:
    """(the frames of ``source``, the color of numpy frames it yields: "bgr" for a decoded video file, None: as the
    caller says). ``source``: a video file path, or a list or iterator of frames (paths, PIL images, arrays)."""
    if isinstance(source, (str, Path)):
        if Path(source).suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"{source}: not a video file ({', '.join(sorted(VIDEO_SUFFIXES))}); give a list of "
                             "frames for images")
        if not Path(source).is_file():
            raise FileNotFoundError(f"no video file at {source}")
        return (frame for _, _, _, frame in video_frames(Path(source))), "bgr"
    if isinstance(source, Iterable):
        return iter(source), None
    raise TypeError(f"a video source is a video file path or a list / iterator of frames, got {type(source).__name__}")

"""Frames of a video for ``SpikingDetector.predict_video``: a video file, or frames given one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


def video_frames(path: str | Path) -> Iterator[tuple[int, int, float, object]]:
    """(frame index from 1, frame count, fps, BGR frame) of every frame OpenCV decodes from the file ``path``."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"cannot open the video {path} (not a video file, or a codec OpenCV lacks)")
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            index += 1
            yield index, total, fps, frame
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
        return (frame for _, _, _, frame in video_frames(source)), "bgr"
    if isinstance(source, Iterable):
        return iter(source), None
    raise TypeError(f"a video source is a video file path or a list / iterator of frames, got {type(source).__name__}")

"""What both detector families share: the ``SpikingDetector`` composition and the ``Results`` it returns."""

from .base import KEYFRAME_EVERY, Batch, Schedule, Selection, SpikingDetector, VideoPredictor, read_bgr
from .results import Boxes, DetectionEvent, Results, RunFigures
from .single import SingleStageDetector

__all__ = ["KEYFRAME_EVERY", "Batch", "Boxes", "DetectionEvent", "Results", "RunFigures", "Schedule", "Selection",
           "SingleStageDetector", "SpikingDetector", "VideoPredictor", "read_bgr"]

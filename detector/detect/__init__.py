"""What both detector families share: the ``SpikingDetector`` composition and the ``Results`` it returns."""

from .base import Batch, Schedule, Selection, SpikingDetector, read_bgr
from .results import Boxes, DetectionEvent, Results

__all__ = ["Batch", "Boxes", "DetectionEvent", "Results", "Schedule", "Selection", "SpikingDetector", "read_bgr"]

"""Model adapters: Ultralytics YOLO (``yolo``) and torchvision Faster R-CNN (``rcnn``).

``as_records`` gives one image's ``Results`` a plain form, for the evaluator.
"""

from __future__ import annotations


def as_records(result, names=None) -> dict:
    """One image's detections as plain lists: ``boxes`` xyxy original pixels, ``scores``, ``classes``
    (0-based), ``names``, and the run's ``steps`` (total T), ``spikes``, ``energy_uj`` (None for the QANN).

    ``result``: a ``detector.detect.Results``; ``names`` (a list by class id) overrides its names.
    """
    classes = [int(c) for c in result.boxes.cls]
    labels = [names[c] if 0 <= c < len(names) else str(c) for c in classes] if names else result.labels
    return {"boxes": result.boxes.xyxy.tolist(), "scores": result.boxes.conf.tolist(), "classes": classes,
            "names": labels, "steps": result.steps, "spikes": result.spikes, "energy_uj": result.energy_uj}

"""Model adapters: Ultralytics YOLO (``yolo``) and torchvision Faster R-CNN (``rcnn``).

``as_records`` gives both families' results one plain form, for the evaluator and the service.
"""

from __future__ import annotations


def as_records(result, names=None) -> dict:
    """One image's detections as plain lists: ``boxes`` xyxy original pixels, ``scores``, ``classes``
    (0-based), ``names``, and the run's ``steps`` (total T), ``spikes``, ``energy_uj`` where known.

    ``result``: a ``yolo.Detections`` or a Faster R-CNN result dict (torchvision labels are 1-based,
    0 being the background, so they are shifted here).
    """
    if isinstance(result, dict):  # torchvision format
        classes = [int(k) - 1 for k in result["labels"]]
        labels = result.get("names") or [names[c] if names and 0 <= c < len(names) else str(c) for c in classes]
        steps = result.get("steps")
        return {"boxes": [[float(v) for v in b] for b in result["boxes"]],
                "scores": [float(s) for s in result["scores"]], "classes": classes, "names": list(labels),
                "steps": steps.get("total") if isinstance(steps, dict) else steps,
                "spikes": result.get("spikes"), "energy_uj": result.get("energy_uj")}
    return {"boxes": [[float(v) for v in b] for b in result.boxes], "scores": [float(s) for s in result.scores],
            "classes": [int(c) for c in result.classes], "names": result.labels,
            "steps": result.steps, "spikes": result.spikes, "energy_uj": result.energy_uj}

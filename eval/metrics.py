"""Detection metrics: COCO (pycocotools) and PASCAL VOC (07 11-point and all-point AP).

Inputs are plain: ground truth as a list of per-image dicts ``{"image_id", "boxes" [N,4] xyxy
pixels, "labels" [N] 0-based, "difficult" [N] bool, "height", "width"}`` and detections as a
list of per-image dicts ``{"image_id", "boxes", "scores", "labels"}`` (numpy or tensors; ``detection_columns``
makes them from a result's plain form, ``Results.to_dict``).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np


def _np(a, dtype=None) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def detection_columns(record: dict) -> dict:
    """The detections of a ``Results.to_dict()`` record as the columns the metrics take: ``boxes`` [N, 4] xyxy,
    ``scores`` [N], ``labels`` [N] (0-based class ids)."""
    detections = record["detections"]
    return {"boxes": np.asarray([d["box"] for d in detections], np.float64).reshape(-1, 4),
            "scores": [d["score"] for d in detections], "labels": [d["class_id"] for d in detections]}


def coco_metrics(ground_truth: list[dict], detections: list[dict], classes: list[str]) -> dict:
    """mAP50-95, mAP50, mAP75, mAP small/medium/large and per-class AP50-95 with pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations = [], []
    for gt in ground_truth:
        images.append({"id": int(gt["image_id"]), "height": int(gt["height"]), "width": int(gt["width"])})
        boxes, labels = _np(gt["boxes"], np.float64).reshape(-1, 4), _np(gt["labels"], np.int64)
        difficult = _np(gt.get("difficult", np.zeros(len(labels), bool)), bool)
        for box, label, hard in zip(boxes, labels, difficult):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": int(gt["image_id"]),
                                "category_id": int(label) + 1, "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                                "area": float(w * h), "iscrowd": int(hard)})
    results = []
    for det in detections:
        boxes = _np(det["boxes"], np.float64).reshape(-1, 4)
        for box, score, label in zip(boxes, _np(det["scores"], np.float64), _np(det["labels"], np.int64)):
            results.append({"image_id": int(det["image_id"]), "category_id": int(label) + 1,
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                            "score": float(score)})
    keys = ["map50_95", "map50", "map75", "map_small", "map_medium", "map_large"]
    if not results:
        return {**{k: 0.0 for k in keys}, "per_class": {c: 0.0 for c in classes}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt_api = COCO()
        gt_api.dataset = {"images": images, "annotations": annotations,
                          "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
        gt_api.createIndex()
        dt_api = gt_api.loadRes(results)
        evaluator = COCOeval(gt_api, dt_api, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(s), 0.0) for s in evaluator.stats[:6]]  # -1 means "no such objects"
    metrics = dict(zip(keys, [stats[0], stats[1], stats[2], stats[3], stats[4], stats[5]]))
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, max_dets]
    per_class = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else 0.0
    metrics["per_class"] = per_class
    return metrics


def _voc_ap(recall: np.ndarray, precision: np.ndarray, eleven_point: bool) -> float:
    if eleven_point:  # VOC2007: mean of the max precision at recall >= 0, 0.1, ..., 1
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    changes = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def voc_metrics(ground_truth: list[dict], detections: list[dict], classes: list[str], iou_threshold: float = 0.5) -> dict:
    """VOC AP per class (difficult objects neither count nor penalise), 07 11-point and all-point."""
    by_image = {int(gt["image_id"]): gt for gt in ground_truth}
    ap07, ap_all = {}, {}
    for k, name in enumerate(classes):
        gt_boxes, gt_hard, used, positives = {}, {}, {}, 0
        for image_id, gt in by_image.items():
            labels = _np(gt["labels"], np.int64)
            mask = labels == k
            gt_boxes[image_id] = _np(gt["boxes"], np.float64).reshape(-1, 4)[mask]
            gt_hard[image_id] = _np(gt.get("difficult", np.zeros(len(labels), bool)), bool)[mask]
            used[image_id] = np.zeros(int(mask.sum()), bool)
            positives += int((~gt_hard[image_id]).sum())
        scored = []
        for det in detections:
            labels = _np(det["labels"], np.int64)
            boxes = _np(det["boxes"], np.float64).reshape(-1, 4)
            for box, score in zip(boxes[labels == k], _np(det["scores"], np.float64)[labels == k]):
                scored.append((float(score), int(det["image_id"]), box))
        scored.sort(key=lambda s: -s[0])
        tp, fp = np.zeros(len(scored)), np.zeros(len(scored))
        for i, (_, image_id, box) in enumerate(scored):
            candidates = gt_boxes.get(image_id, np.zeros((0, 4)))
            if len(candidates):
                overlaps = _iou(box, candidates)
                j = int(overlaps.argmax())
                if overlaps[j] >= iou_threshold:
                    if gt_hard[image_id][j]:
                        continue  # matched a difficult object: ignored
                    if not used[image_id][j]:
                        used[image_id][j] = True
                        tp[i] = 1
                        continue
            fp[i] = 1
        if positives == 0:
            ap07[name] = ap_all[name] = 0.0
            continue
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
        recall = tp_cum / positives
        precision = tp_cum / np.maximum(tp_cum + fp_cum, 1e-12)
        ap07[name] = _voc_ap(recall, precision, eleven_point=True)
        ap_all[name] = _voc_ap(recall, precision, eleven_point=False)
    return {"voc07_map50": float(np.mean(list(ap07.values()))) if ap07 else 0.0,
            "voc_map50": float(np.mean(list(ap_all.values()))) if ap_all else 0.0,
            "per_class_voc07": ap07, "per_class": ap_all}

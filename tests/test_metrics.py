"""COCO and VOC metrics on hand-made cases with known answers."""

import numpy as np
import pytest

from eval.metrics import coco_metrics, detection_columns, voc_metrics

CLASSES = ["a", "b"]


def gt(image_id, boxes, labels, difficult=None):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    return {"image_id": image_id, "boxes": boxes, "labels": np.array(labels, np.int64), "height": 100, "width": 100,
            "difficult": np.array(difficult if difficult is not None else [False] * len(labels))}


def det(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "scores": np.array(scores, np.float32), "labels": np.array(labels, np.int64)}


GROUND_TRUTH = [gt(1, [[10, 10, 50, 50], [60, 60, 90, 95]], [0, 1]), gt(2, [[20, 20, 70, 70]], [0])]


def test_perfect_detections_score_one():
    perfect = [det(g["image_id"], g["boxes"], [0.9] * len(g["labels"]), g["labels"]) for g in GROUND_TRUTH]
    coco = coco_metrics(GROUND_TRUTH, perfect, CLASSES)
    assert coco["map50_95"] == pytest.approx(1.0) and coco["map50"] == pytest.approx(1.0)
    assert coco["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    voc = voc_metrics(GROUND_TRUTH, perfect, CLASSES)
    assert voc["voc07_map50"] == pytest.approx(1.0) and voc["voc_map50"] == pytest.approx(1.0)


def test_detection_columns_read_a_results_plain_form():
    record = {"detections": [{"box": [10, 10, 50, 50], "score": 0.9, "class_id": 0, "name": "a"},
                             {"box": [60, 60, 90, 95], "score": 0.8, "class_id": 1, "name": "b"}], "steps": 6}
    columns = detection_columns(record)
    assert columns["boxes"].tolist() == [[10, 10, 50, 50], [60, 60, 90, 95]] and columns["labels"] == [0, 1]
    assert columns["scores"] == [0.9, 0.8] and detection_columns({"detections": []})["boxes"].shape == (0, 4)
    coco = coco_metrics(GROUND_TRUTH[:1], [{"image_id": 1, **columns}], CLASSES)
    assert coco["map50_95"] == pytest.approx(1.0)


def test_no_detections_score_zero():
    assert coco_metrics(GROUND_TRUTH, [], CLASSES)["map50_95"] == 0.0
    assert voc_metrics(GROUND_TRUTH, [], CLASSES)["voc_map50"] == 0.0


def test_voc_all_point_and_eleven_point_on_a_known_ranking():
    # class a: 2 objects; ranked detections: hit, false positive, hit -> P/R: (1, .5), (.5, .5), (.67, 1)
    detections = [det(1, [[10, 10, 50, 50]], [0.9], [0]), det(2, [[0, 0, 5, 5], [20, 20, 70, 70]], [0.8, 0.7], [0, 0])]
    voc = voc_metrics(GROUND_TRUTH, detections, CLASSES)
    assert voc["per_class"]["a"] == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))
    assert voc["per_class_voc07"]["a"] == pytest.approx((6 * 1 + 5 * (2 / 3)) / 11)
    assert voc["per_class"]["b"] == 0.0


def test_voc_difficult_objects_are_ignored():
    ground_truth = [gt(1, [[10, 10, 50, 50], [60, 60, 90, 90]], [0, 0], [False, True])]
    detections = [det(1, [[60, 60, 90, 90], [10, 10, 50, 50]], [0.95, 0.9], [0, 0])]
    assert voc_metrics(ground_truth, detections, ["a"])["voc_map50"] == pytest.approx(1.0)


def test_coco_localisation_quality_lowers_map50_95_not_map50():
    shifted = [det(1, [[14, 14, 54, 54], [60, 60, 90, 95]], [0.9, 0.9], [0, 1]), det(2, [[20, 20, 70, 70]], [0.9], [0])]
    coco = coco_metrics(GROUND_TRUTH, shifted, CLASSES)
    assert coco["map50"] == pytest.approx(1.0)
    assert 0.5 < coco["map50_95"] < 1.0

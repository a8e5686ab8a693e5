"""One results type for both families: boxes, drawing, saving, plain forms, the shared predict arguments."""

import json

import cv2
import numpy as np
import pytest
import torch

from detector.data import ensure_bundled
from dataclasses import FrozenInstanceError

from detector.detect import Boxes, Results, RunFigures, SpikingDetector
from detector.detect.results import class_color
from detector.weights import load_detector


@pytest.fixture(scope="module")
def image_path():
    return ensure_bundled() / "images" / "val" / "000000.jpg"


@pytest.fixture(scope="module")
def detectors():
    torch.set_num_threads(1)
    return {"yolo": load_detector("yolov8n-bundled"), "rcnn": load_detector("rcnn-r18-bundled")}


@pytest.fixture(scope="module")
def found(detectors, image_path):
    """Each family's detections of the bundled val image at the default schedule."""
    return {family: det.predict([str(image_path)], conf=0.05)[0] for family, det in detectors.items()}


def one_box() -> Results:
    boxes = Boxes(torch.tensor([[10.0, 20.0, 50.0, 40.0]]), torch.tensor([0.75]), torch.tensor([2]), (60, 100))
    return Results(boxes, {0: "a", 1: "b", 2: "circle"}, orig_img=np.zeros((60, 100, 3), np.uint8),
                   run=RunFigures(steps=7))


def test_boxes_formats():
    b = one_box().boxes
    assert b.xywh.tolist() == [[30.0, 30.0, 40.0, 20.0]]
    assert b.xywhn[0].tolist() == pytest.approx([0.3, 0.5, 0.4, 20 / 60])
    assert len(b) == 1 and len(b.select(b.conf > 0.8)) == 0 and len(Boxes.empty((5, 5))) == 0


def test_plot_draws_each_box_in_its_class_colour_and_labels_it():
    r = one_box()
    plain = r.plot(labels=False, line_width=2)
    assert plain.shape == (60, 100, 3) and plain.dtype == np.uint8
    assert tuple(plain[30, 10]) == class_color(2) and tuple(plain[20, 30]) == class_color(2)  # left, top edges
    assert not plain[30, 30].any() and not r.orig_img.any()  # inside untouched, original not drawn on
    labelled = r.plot(line_width=2)
    assert (labelled[:20, 10:50] != 0).any()  # the "circle 0.75" tag sits above the box
    with pytest.raises(ValueError, match="no image"):
        Results(r.boxes, r.names).plot()


def test_save_save_txt_and_json(tmp_path):
    r = one_box()
    written = cv2.imread(r.save(tmp_path / "sub" / "a.png"))
    assert (written == r.plot()).all()
    assert r.save_txt(tmp_path / "a.txt") == str(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "2 0.3 0.5 0.4 0.333333\n"  # YOLO labels: cls xc yc w h
    r.save_txt(tmp_path / "c.txt", save_conf=True)
    assert (tmp_path / "c.txt").read_text() == "2 0.3 0.5 0.4 0.333333 0.75\n"
    d = json.loads(r.to_json())
    assert d["detections"] == [{"box": [10.0, 20.0, 50.0, 40.0], "score": 0.75, "class_id": 2, "name": "circle"}]
    assert d["orig_shape"] == [60, 100] and d["steps"] == 7 and d["stage_steps"] is None
    with pytest.raises(ValueError, match="cannot write"):
        r.save(tmp_path / "a.unknown")


def test_both_families_return_results_with_their_figures(found):
    y, r = found["yolo"], found["rcnn"]
    assert type(y) is type(r) is Results and len(y) > 0 and len(r) > 0
    assert y.stage_steps is None and y.proposals is None and y.steps >= 4
    assert r.steps == r.stage_steps["stage1"] + r.stage_steps["stage2"] and r.proposals > 0
    for res in (y, r):
        assert res.settled is True and res.spikes > 0 and res.energy_uj > 0 and res.orig_shape == (256, 256)
        assert set(res.speed) == {"preprocess", "inference", "postprocess"} and res.speed["inference"] > 0
        assert res.boxes.cls.dtype == torch.int64 and 0 <= int(res.boxes.cls.min())
        assert int(res.boxes.cls.max()) < len(res.names) and res.labels[0] == res.names[int(res.boxes.cls[0])]
        assert res.plot().shape == (256, 256, 3)


def test_to_dict_is_the_one_plain_form_and_the_figures_are_set_when_built(found, detectors, image_path):
    for res in found.values():
        exact, rounded = res.to_dict(decimals=None), res.to_dict()
        assert [d["box"] for d in exact["detections"]] == res.boxes.xyxy.tolist()
        assert [d["box"] for d in rounded["detections"]] == [[round(v, 3) for v in b] for b in res.boxes.xyxy.tolist()]
        assert [d["score"] for d in exact["detections"]] == res.boxes.conf.tolist()
        assert [(d["class_id"], d["name"]) for d in exact["detections"]] == \
            list(zip(res.boxes.cls.tolist(), res.labels))
        assert {k: exact[k] for k in ("steps", "settled", "spikes", "energy_uj", "stage_steps", "proposals")} == \
            {"steps": res.run.steps, "settled": res.run.settled, "spikes": res.run.spikes,
             "energy_uj": res.run.energy_uj, "stage_steps": res.run.stage_steps, "proposals": res.run.proposals}
        with pytest.raises(FrozenInstanceError):  # built once, with its figures
            res.steps = 3
    qann = detectors["yolo"].qann_predict([str(image_path)], conf=0.05)[0].to_dict()
    assert qann["steps"] is None and qann["spikes"] is None and set(qann["speed"]) == {"preprocess", "inference",
                                                                                       "postprocess"}
    with pytest.raises(AttributeError, match="no attribute 'stepz'"):
        found["yolo"].stepz


def test_one_predict_for_both_families():
    """Both adapters take predict / stream / qann_predict / detections_at_steps from the one composition."""
    from detector.models.rcnn import SpikingFasterRCNN
    from detector.models.yolo import SpikingYOLO

    for name in ("predict", "qann_predict", "stream", "detections_at_steps"):
        assert getattr(SpikingYOLO, name) is getattr(SpikingDetector, name)
        assert getattr(SpikingFasterRCNN, name) is getattr(SpikingDetector, name)


@pytest.mark.parametrize("family", ["yolo", "rcnn"])
def test_classes_iou_and_max_det_select_the_detections(detectors, found, image_path, family):
    det, every = detectors[family], found[family]
    cls = int(every.boxes.cls[0])
    only = det.predict([str(image_path)], conf=0.05, classes=[cls])[0]
    assert set(only.boxes.cls.tolist()) == {cls}
    assert torch.equal(only.boxes.conf, every.boxes.conf[every.boxes.cls == cls])
    top = det.predict([str(image_path)], conf=0.05, max_det=2)[0]
    assert torch.equal(top.boxes.conf, every.boxes.conf[:2])
    from torchvision.ops import box_iou

    # At a low score threshold the detector's own NMS (IoU 0.7) keeps overlapping boxes of one class;
    # a strict IoU removes some of them, whatever the model's accuracy.
    loose = det.predict([str(image_path)], conf=0.001)[0]
    strict = det.predict([str(image_path)], conf=0.001, iou=0.05)[0]
    assert len(strict) < len(loose)
    for c in set(strict.boxes.cls.tolist()):  # no two boxes of one class overlap by more than iou
        boxes = strict.boxes.xyxy[strict.boxes.cls == c]
        overlap = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert float(overlap.max()) <= 0.05


@pytest.mark.parametrize("family", ["yolo", "rcnn"])
def test_stream_events_carry_results_up_to_predicts(detectors, found, image_path, family):
    events = list(detectors[family].stream(str(image_path), conf=0.05))
    final, ref = events[-1], found[family]
    assert all(isinstance(e.detections, Results) for e in events) and final.final
    assert [e.t for e in events] == list(range(1, ref.steps + 1))
    assert torch.equal(final.detections.boxes.xyxy, ref.boxes.xyxy)
    assert (final.detections.steps, final.detections.stage_steps) == (ref.steps, ref.stage_steps)
    assert final.cumulative_spikes == pytest.approx(ref.spikes)

"""torchvision Faster R-CNN adapter: two spiking stages, exactness against the QANN, training CLI, errors."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detector import UnsupportedModuleError
from detector.randnet import randomise_batchnorm
from detector.models.rcnn import (
    SpikingFasterRCNN,
    analog_candidates,
    build_fasterrcnn,
    build_qann_fasterrcnn,
    to_qann_fasterrcnn,
)
from detector.neurons import CIFNeuron
from detector.quant import ClipQuan

SMALL = dict(min_size=64, max_size=96, representation_size=64, rpn_pre_nms_top_n_test=40,
             rpn_post_nms_top_n_test=12)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random (Frozen)BatchNorm statistics and a box predictor whose classes clear the score threshold."""
    randomise_batchnorm(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        cls = model.roi_heads.box_predictor.cls_score
        cls.bias.copy_(torch.randn(cls.bias.shape, generator=g) * 3)
        model.rpn.head.cls_logits.bias.copy_(torch.randn(model.rpn.head.cls_logits.bias.shape, generator=g))
    return model


def image(seed: int = 0, h: int = 90, w: int = 120) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_tree_close(a, b, atol=1e-9):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_tree_close(a[k], b[k], atol)
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_close(x, y, atol)


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    qann = randomise(build_qann_fasterrcnn("resnet18_fpn", num_classes=4, levels=4, **SMALL)).double().eval()
    return SpikingFasterRCNN.from_model(qann).double()


@pytest.mark.parametrize("arch", ["resnet18_fpn", "resnet50_fpn", "resnet50_fpn_v2"])
def test_exact_two_stages(arch, r18):
    torch.manual_seed(1)
    if arch == "resnet18_fpn":
        det = r18
    else:
        det = SpikingFasterRCNN.from_model(randomise(build_qann_fasterrcnn(arch, num_classes=4, levels=4, **SMALL),
                                                     seed=1).double().eval()).double()
    imgs = [image(0), image(1, 70, 100)]
    snn = det.predict(imgs, wake=4, sleep="auto", conf=0.0)
    s = det.internals(imgs, wake=4, sleep="auto")
    ann = det.qann_predict(imgs, conf=0.0)
    q = det.internals(imgs, spiking=False)
    assert q["runs"] == [] and len(s["runs"]) == 2
    run1, run2 = s["runs"]
    assert bool(run1.settled.all()) and bool(run2.settled.all())
    assert [a.stage_steps["stage1"] for a in snn] == run1.steps.tolist()
    assert [a.proposals for a in snn] == [len(p) for p in s["proposals"]] == [len(p) for p in q["proposals"]]
    # stage-1 readouts, proposals, stage-2 readouts, detections: all the QANN's
    assert_tree_close(s["features"], q["features"])
    assert_tree_close(s["objectness"], q["objectness"])
    assert_tree_close(s["deltas"], q["deltas"])
    assert_tree_close(s["proposals"], q["proposals"])
    assert_tree_close(s["class_logits"], q["class_logits"])
    assert_tree_close(s["box_regression"], q["box_regression"])
    for a, b in zip(snn, ann):
        assert len(a) > 0 and b.steps is None and b.settled is None
        assert_tree_close([a.boxes.xyxy, a.boxes.conf], [b.boxes.xyxy, b.boxes.conf])
        assert torch.equal(a.boxes.cls, b.boxes.cls)
        assert a.settled and a.stage_steps["stage1"] > 4 and a.stage_steps["stage2"] >= 5
        assert a.steps == a.stage_steps["stage1"] + a.stage_steps["stage2"]
        assert a.spikes > 0 and a.energy_uj > 0
    # and our decoding pipeline is torchvision's own forward of the QANN
    det.qann.roi_heads.score_thresh = 0.0
    try:
        tv = det.qann([im.clone() for im in imgs])
    finally:
        det.qann.roi_heads.score_thresh = 0.05
    for a, b in zip(ann, tv):  # torchvision's labels are 1-based (0: background), ours 0-based
        assert_tree_close([a.boxes.xyxy, a.boxes.conf], [b["boxes"], b["scores"]])
        assert torch.equal(a.boxes.cls + 1, b["labels"])


def test_every_call_site_has_its_own_state():
    det = SpikingFasterRCNN.from_model(randomise(build_qann_fasterrcnn("resnet50_fpn", num_classes=3, levels=4,
                                                                      **SMALL)).double().eval()).double()
    det.predict([image()], wake=4, sleep=2)
    sites = {name: m for name, m in det.stage1.neurons()}
    bottlenecks = [n for n in sites if n.startswith("backbone.body.layer") and n.endswith(".relu")]
    body = det.qann.backbone.body
    assert len(bottlenecks) == sum(len(getattr(body, f"layer{i}")) for i in range(1, 5))  # 3 + 4 + 6 + 3
    for name in bottlenecks:  # Bottleneck's one self.relu, called three times
        assert sites[name].call_sites == 3, name
        shapes = [tuple(s[0].shape) for s in sites[name]._states]
        assert len(shapes) == 3
    assert sites["backbone.body.relu"].call_sites == 1
    rpn = sites["rpn_head.conv.0.1"]  # the RPN head applied to each FPN level
    levels = len(det.qann.rpn.anchor_generator.sizes)  # FPN levels P2-P6 (the pool level included)
    assert rpn.call_sites == levels == 5
    assert len({tuple(s[0].shape) for s in rpn._states}) == 5  # one state per level, each its own size
    heads = dict(det.stage2.neurons())
    assert set(heads) == {"box_head.relu6", "box_head.relu7"}  # TwoMLPHead's F.relu made modules
    assert all(m.call_sites == 1 and isinstance(m, CIFNeuron) for m in heads.values())
    # no max-pool or BatchNorm left: stem pool is an LIPool, every FrozenBatchNorm folded
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in det.qann.backbone.modules())
    assert frozen == 1 + 3 * len(bottlenecks) + 4  # stem, three per bottleneck, four downsample branches
    assert det.stage1.batchnorm_kept == 0 and det.stage1.batchnorm_folded == frozen
    assert any(type(m).__name__ == "LIPool" for m in det.stage1.modules())


def test_stream_ends_with_predict_and_multistep_agrees(r18):
    img = image(3)
    ref = r18.predict([img], conf=0.0)[0]
    events = list(r18.stream(img, conf=0.0))
    assert [e.final for e in events] == [False] * (len(events) - 1) + [True]
    assert all(isinstance(e.spikes, float) for e in events)
    assert sum(e.spikes for e in events) == pytest.approx(ref.spikes)
    assert np.allclose(np.cumsum([e.spikes for e in events]), [e.cumulative_spikes for e in events])
    assert [e.t for e in events] == list(range(1, ref.steps + 1))
    assert [e.detections.steps for e in events] == [e.t for e in events]  # each event's figures so far
    stage1 = [e for e in events if e.stage == 1]
    stage2 = [e for e in events if e.stage == 2]
    assert [e.stage_t for e in stage1] == list(range(1, ref.stage_steps["stage1"] + 1))
    assert [e.stage_t for e in stage2] == list(range(1, ref.stage_steps["stage2"] + 1))
    assert all(len(e.detections) == 0 for e in stage1) and any(len(e.detections) for e in stage2)
    assert stage2[0].phase == "wake" and stage1[-1].settled and events[-1].final
    last = events[-1].detections
    assert torch.equal(last.boxes.xyxy, ref.boxes.xyxy) and torch.equal(last.boxes.conf, ref.boxes.conf)
    assert torch.equal(last.boxes.cls, ref.boxes.cls)
    assert (last.steps, last.stage_steps, last.spikes, last.settled) == (ref.steps, ref.stage_steps, ref.spikes, True)
    assert last.energy_uj == pytest.approx(ref.energy_uj)
    multi = r18.predict([img], conf=0.0, mode="multistep")[0]
    assert (multi.steps, multi.stage_steps) == (ref.steps, ref.stage_steps)
    assert_tree_close([multi.boxes.xyxy, multi.boxes.conf], [ref.boxes.xyxy, ref.boxes.conf])
    # numpy uint8 inputs (RGB, the family's default; BGR when said) go through the same preprocessing
    arr = (np.random.default_rng(0).random((50, 60, 3)) * 255).astype(np.uint8)
    out = r18.predict([arr], conf=0.0)
    assert out[0].boxes.xyxy.shape[1] == 4 and out[0].boxes.xyxy[:, 2].max() <= 60 + 1e-3
    assert out[0].orig_shape == (50, 60) and (out[0].orig_img == arr[..., ::-1]).all()
    bgr = r18.predict([np.ascontiguousarray(arr[..., ::-1])], conf=0.0, color="bgr")[0]
    assert torch.equal(bgr.boxes.xyxy, out[0].boxes.xyxy) and torch.equal(bgr.boxes.cls, out[0].boxes.cls)


def _write_images(folder, names, size=(80, 64)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / name)


def _coco_fixture(root):
    names = [f"im{i}.jpg" for i in range(4)]
    _write_images(root / "images" / "train", names)
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [10, 8, 30 + i, 25], "area": 750,
             "iscrowd": 0} for i in range(4)]
    data = {"images": [{"id": i + 1, "file_name": n, "width": 80, "height": 64} for i, n in enumerate(names)],
            "annotations": anns, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))


def _voc_fixture(root):
    ids = [f"00000{i}" for i in range(4)]
    _write_images(root / "JPEGImages", [f"{i}.jpg" for i in ids])
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for k, i in enumerate(ids):
        name = ("dog", "cat")[k % 2]
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>80</width><height>64</height><depth>3</depth>"
            f"</size><object><name>{name}</name><difficult>0</difficult><bndbox><xmin>10</xmin><ymin>8</ymin>"
            f"<xmax>{40 + k}</xmax><ymax>33</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_train_cli_then_convert_and_predict(fmt, tmp_path):
    from casc.cli import main

    data = tmp_path / fmt
    (_coco_fixture if fmt == "coco" else _voc_fixture)(data)
    out = tmp_path / "run"
    args = ["train", "rcnn", "--arch", "resnet18_fpn", "--data", f"{fmt}:{data}" if fmt == "voc" else str(data),
            "--levels", "4", "--epochs", "1", "--batch", "2", "--lr", "0.001", "--min-size", "64", "--max-size", "96",
            "--representation-size", "32", "--out", str(out), "--workers", "0", "--warmup-iters", "2"]
    assert main(args) == 0
    ckpt = out / "last.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["meta"]["arch"] == "resnet18_fpn" and saved["meta"]["levels"] == 4 and saved["epoch"] == 0
    n_classes = saved["meta"]["num_classes"]
    assert n_classes == (3 if fmt == "coco" else 21)
    # resume: one more epoch from the saved optimizer / scheduler state
    assert main(args[:args.index("--epochs")] + ["--epochs", "2"] + args[args.index("--epochs") + 2:]
                + ["--resume", str(ckpt)]) == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    det = SpikingFasterRCNN.from_checkpoint(ckpt, sha256=digest)
    assert det.levels == 4 and det.classes == saved["meta"]["classes"]
    img = next((data / ("images/train" if fmt == "coco" else "JPEGImages")).glob("*.jpg"))
    res = det.predict([str(img)], conf=0.0)
    assert res[0].boxes.xyxy.shape[-1] == 4 and res[0].stage_steps["stage1"] >= 4 and res[0].path == str(img)
    assert set(res[0].names.values()) == set(saved["meta"]["classes"])
    if fmt == "coco":  # --float trains the float model; converting it quantizes (levels default 4)
        float_out = tmp_path / "float"
        assert main(args[:args.index("--out")] + ["--out", str(float_out), "--workers", "0", "--float"]) == 0
        meta = torch.load(float_out / "last.pt", weights_only=True)["meta"]
        assert meta["levels"] is None
        det = SpikingFasterRCNN.from_checkpoint(float_out / "last.pt")
        assert det.levels == 4 and len(det.predict([str(img)])) == 1
        # --spiking-fpn: the signed FPN quantizers, calibrated on the training images, trained and saved with it
        from detector.models.rcnn import has_spiking_fpn

        sfpn_out = tmp_path / "sfpn"
        sfpn_args = args[:args.index("--out")] + ["--out", str(sfpn_out), "--workers", "0", "--spiking-fpn",
                                                  "--calibrate-images", "2"]
        assert main(sfpn_args) == 0
        saved = torch.load(sfpn_out / "last.pt", weights_only=True)
        assert saved["meta"]["spiking_fpn"] is True and has_spiking_fpn(saved["state_dict"])
        det = SpikingFasterRCNN.from_checkpoint(sfpn_out / "last.pt")
        assert has_spiking_fpn(det.qann) and len(det.predict([str(img)])) == 1
        assert main(sfpn_args + ["--float"]) == 2  # a float model has no QANN to add the quantizers to


def test_float_torchvision_state_dict_is_quantized_on_load(tmp_path):
    torch.manual_seed(0)
    model = build_fasterrcnn("resnet18_fpn", num_classes=3, **SMALL)
    path = tmp_path / "float.pth"
    torch.save(model.state_dict(), path)
    det = SpikingFasterRCNN.from_checkpoint(path, arch="resnet18_fpn", levels=2, min_size=64, max_size=96)
    assert det.levels == 2 and det.qann.roi_heads.box_predictor.cls_score.out_features == 3
    assert sum(isinstance(m, ClipQuan) for m in det.qann.modules()) == 2 + 8 + 1 + 1  # box head, blocks, stem, rpn


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        SpikingFasterRCNN.from_checkpoint(tmp_path / "missing.pth")
    path = tmp_path / "w.pth"
    torch.save(build_fasterrcnn("resnet18_fpn", num_classes=3, **SMALL).state_dict(), path)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        SpikingFasterRCNN.from_checkpoint(path, arch="resnet18_fpn", sha256="0" * 64)
    with pytest.raises(ValueError, match="unknown Faster R-CNN arch"):
        build_fasterrcnn("vgg16")
    with pytest.raises(ValueError, match="needs a QANN"):
        SpikingFasterRCNN(build_fasterrcnn("resnet18_fpn", num_classes=3, **SMALL))
    mobile = to_qann_fasterrcnn(build_fasterrcnn("mobilenet_v3_large_fpn", num_classes=3, min_size=64, max_size=96), 4)
    with pytest.raises(UnsupportedModuleError, match="MobileNetV3") as info:
        SpikingFasterRCNN.from_model(mobile)
    kinds = {kind for _, kind, _ in info.value.problems}
    assert {"Hardswish", "SqueezeExcitation"} <= kinds
    # named as analog islands, it runs (a reported hybrid)
    det = SpikingFasterRCNN.from_model(mobile, analog=analog_candidates(mobile))
    out = det.predict([image().float()], conf=0.0)
    run1 = det.internals([image().float()])["runs"][0]
    assert out[0].settled and bool(run1.settled.all()) and 0 < run1.stats.analog_mac_fraction < 1
    assert out[0].stage_steps["stage1"] == int(run1.steps[0])


# --- the IF baseline and anytime detections ------------------------------------------------------

@pytest.fixture(scope="module")
def r18_float():
    torch.manual_seed(0)
    return randomise(build_fasterrcnn("resnet18_fpn", num_classes=4, **SMALL)).double().eval()


def _max_feature_error(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.values(), b.values()))


def test_if_baseline_approaches_the_float_model(r18_float):
    calib = [image(5), (np.random.default_rng(1).random((80, 100, 3)) * 255).astype(np.uint8)]
    det = SpikingFasterRCNN.from_model(r18_float, neuron="if", calibration=calib).double()
    assert det.neuron == "if" and det.levels is None and det.percentile == 99.9
    assert type(r18_float.roi_heads.box_head).__name__ == "ReLUTwoMLPHead"  # built that way, not modified
    heads = dict(det.stage2.neurons())
    assert set(heads) == {"box_head.relu6", "box_head.relu7"}
    assert all(type(m).__name__ != "CIFNeuron" for m in heads.values())
    imgs = [image(0), image(1, 70, 100)]
    ref = det.internals(imgs[:1], spiking=False)  # the float model it was converted from (the ANN baseline)
    # stage-1 readouts after step T of one stream = the wake=T runs (no sleep)
    x = det.preprocess(imgs[:1])[0].tensors
    errors = {ev.t: _max_feature_error(OrderedDict(ev.readout[0]), ref["features"])
              for ev in det.stage1.stream(x, wake=256, sleep=0) if ev.t in (8, 256)}
    assert errors[256] < errors[8] / 4, errors
    assert _max_feature_error(det.internals(imgs[:1], wake=8)["features"], ref["features"]) == errors[8]
    # one stream per stage-1 batch serves every t; stage 2 gets wake=t too
    dets, info = det.detections_at_steps(imgs, [4, 1, 16], conf=0.05)
    assert sorted(dets) == [1, 4, 16] and all(len(dets[t]) == 2 for t in dets)
    for t in (1, 4, 16):
        assert info["stage1_steps_at"][t] == [t, t] and info["stage2_steps_at"][t] == [t, t]
        assert info["steps_at"][t] == [2 * t, 2 * t]
    # the readout after step t of the long stream is exactly the wake=t run
    ref16 = det.predict(imgs, wake=16, conf=0.05)
    for a, b in zip(dets[16], ref16):
        assert_tree_close([a.boxes.xyxy, a.boxes.conf], [b.boxes.xyxy, b.boxes.conf], atol=1e-9)
        assert torch.equal(a.boxes.cls, b.boxes.cls)
        assert (a.steps, a.stage_steps, a.energy_uj) == (b.steps, b.stage_steps, pytest.approx(b.energy_uj, rel=1e-9))
        assert a.spikes == pytest.approx(b.spikes, rel=1e-9)
    assert info["steps"] == [32, 32] and [r.steps for r in ref16] == [32, 32]
    assert info["energy_uj"] == pytest.approx([r.energy_uj for r in ref16], rel=1e-9)
    assert info["energy_uj_at"][16] == info["energy_uj"] and all(r.spikes > 0 for r in ref16)
    # each t's figure is that of the wake=t run (no sleep: a shorter run is a prefix of the schedule)
    ref4 = det.predict(imgs, wake=4)
    assert info["energy_uj_at"][4] == pytest.approx([r.energy_uj for r in ref4], rel=1e-9)


def test_if_baseline_errors_and_qann_choice(r18_float, tmp_path):
    with pytest.raises(ValueError, match="needs calibration=images"):
        SpikingFasterRCNN.from_model(r18_float, neuron="if")
    path = tmp_path / "float.pt"
    torch.save(r18_float.state_dict(), path)
    with pytest.raises(ValueError, match="needs calibration=images"):
        SpikingFasterRCNN.from_checkpoint(path, arch="resnet18_fpn", neuron="if", min_size=64, max_size=96)
    with pytest.raises(ValueError, match="CASC only"):
        SpikingFasterRCNN.from_model(r18_float, neuron="if", levels=4, calibration=[image()])
    with pytest.raises(ValueError, match="neuron must be"):
        SpikingFasterRCNN.from_model(r18_float, levels=4, neuron="lif")
    det = SpikingFasterRCNN.from_checkpoint(path, arch="resnet18_fpn", neuron="if", calibration=[image(2)],
                                            min_size=64, max_size=96, representation_size=64)
    assert det.levels is None and not any(isinstance(m, ClipQuan) for m in det.qann.modules())
    with pytest.raises(ValueError, match="give wake=T"):
        det.predict([image().float()])
    with pytest.raises(ValueError, match="leave wake and sleep"):
        det.detections_at_steps([image().float()], [2], wake=2)
    with pytest.raises(ValueError, match="timesteps must be"):
        det.detections_at_steps([image().float()], [])
    # Choice: the IF baseline of a QANN is allowed (its ClipQuan sites get IF neurons with calibrated
    # thresholds); qann_predict is then the QANN. It still needs calibration and an explicit wake.
    qann = to_qann_fasterrcnn(r18_float, 4)
    det = SpikingFasterRCNN.from_model(qann, neuron="if", calibration=[image(2)]).double()
    assert det.levels is None and isinstance(det.qann.backbone.body.relu, ClipQuan)
    out = det.predict([image()], wake=4)
    assert (out[0].steps, out[0].stage_steps) == (8, {"stage1": 4, "stage2": 4})


def test_casc_detections_at_steps_reach_predict(r18):
    imgs = [image(0), image(1, 70, 100)]
    ref = r18.predict(imgs, wake=4, sleep="auto", conf=0.0)
    settle = max(r.stage_steps["stage1"] for r in ref), max(r.stage_steps["stage2"] for r in ref)
    big = max(settle) + 5
    wanted = [1, 3, big, big + 20]
    dets, info = r18.detections_at_steps(imgs, wanted, wake=4, sleep="auto", conf=0.0)
    for key in ("energy_uj_at", "steps_at", "stage1_steps_at", "stage2_steps_at"):
        assert sorted(info[key]) == wanted, key  # every requested t
    assert len(dets[1]) == 2 and info["stage1_steps_at"][1] == [1, 1]  # runs (t=1: one wake step each)
    assert info["steps_at"][3] == [6, 6]
    for a, b in zip(dets[big], ref):
        assert torch.equal(a.boxes.xyxy, b.boxes.xyxy) and torch.equal(a.boxes.conf, b.boxes.conf)
        assert torch.equal(a.boxes.cls, b.boxes.cls)
        assert (a.steps, a.stage_steps, a.settled, a.proposals) == (b.steps, b.stage_steps, True, b.proposals)
        assert a.spikes == pytest.approx(b.spikes) and a.energy_uj == pytest.approx(b.energy_uj, rel=1e-9)
    assert [r.steps for r in dets[1]] == [2, 2] and not any(r.settled for r in dets[1])  # one step per stage
    assert dets[big + 20] is dets[big]  # both stages settled: computed once
    assert info["stage1_steps_at"][big] == [r.stage_steps["stage1"] for r in ref]
    assert info["stage2_steps_at"][big] == [r.stage_steps["stage2"] for r in ref]
    assert info["steps"] == info["steps_at"][big + 20] == [r.steps for r in ref]
    assert info["settled"] == [True, True] and all(r.settled for r in ref)
    assert info["proposals"] == [r.proposals for r in ref]
    # firing rates of both stages' neurons (the box head's too, which the per-layer plot shows as stage 2)
    sites = set(info["firing_rates"])
    assert {"box_head.relu6", "box_head.relu7"} <= sites and any(k.startswith("backbone.") for k in sites)
    assert all(0 <= v <= 4 for v in info["firing_rates"].values())  # at most the burst (4) per step
    # energy: per image, each stage to its budget t; non-decreasing in t; at the largest t predict's
    for i in range(2):
        at = [info["energy_uj_at"][t][i] for t in wanted]
        assert all(0 < e1 <= e2 for e1, e2 in zip(at, at[1:])), at
        assert at[0] < at[-1]
    assert info["energy_uj_at"][big + 20] == pytest.approx([r.energy_uj for r in ref], rel=1e-9)
    assert info["energy_uj"] == info["energy_uj_at"][big + 20]
    # the ANN's energy per image: stage 1 once, stage 2 once per RoI (independently counted MACs)
    from detector.energy import PJ_PER_MAC, count_macs

    x = r18.preprocess(imgs)[0].tensors
    roi = torch.zeros(1, r18.qann.backbone.out_channels, 7, 7, dtype=x.dtype)
    macs1, macs2 = count_macs(r18.qann_stage1, x[:1]), count_macs(r18.qann_stage2, roi)
    assert info["ann_energy_uj"] == pytest.approx([(macs1 + macs2 * r.proposals) * PJ_PER_MAC * 1e-6 for r in ref])


def test_internals_are_what_predict_decodes(r18):
    imgs = [image(0), image(1, 70, 100)]
    ref = r18.predict(imgs, wake=4, sleep="auto", conf=0.0)
    out = r18.internals(imgs, wake=4, sleep="auto")
    assert set(out) == {"features", "objectness", "deltas", "proposals", "class_logits", "box_regression", "runs"}
    # the proposals predict uses: recomputed from the spiking stage-1 readouts of an identical run ...
    image_list, sizes = r18.preprocess(imgs)
    run1, run2 = out["runs"]
    features, objectness, deltas = run1.readout
    again = r18.proposals(image_list, OrderedDict(features), objectness, deltas)
    assert_tree_close(out["proposals"], again, atol=0)
    # ... and decoding the internals gives predict's detections exactly
    dets = r18.decode(out["class_logits"], out["box_regression"], out["proposals"], image_list, sizes, 0.0)
    for a, b in zip(dets, ref):  # torchvision's 1-based labels, the Results' 0-based classes
        assert torch.equal(a["boxes"], b.boxes.xyxy) and torch.equal(a["scores"], b.boxes.conf)
        assert torch.equal(a["labels"] - 1, b.boxes.cls)
    assert [r.proposals for r in ref] == [len(p) for p in out["proposals"]]
    rows = np.cumsum([0] + [len(p) for p in out["proposals"]])
    assert [r.stage_steps["stage2"] for r in ref] == [int(run2.steps[a:b].max()) for a, b in zip(rows, rows[1:])]
    for r, i in zip(ref, range(2)):
        a, b = int(rows[i]), int(rows[i + 1])
        energy = float(run1.stats.energy_pj[i]) + float(run2.stats.energy_pj[a:b].sum())
        assert r.energy_uj == pytest.approx(energy * 1e-6, rel=1e-12)


def test_cancel_stops_predict_and_stream(r18):
    import threading

    from detector.runtime import RunCancelled

    cancel = threading.Event()
    seen = []
    with pytest.raises(RunCancelled):
        for ev in r18.stream(image(3), conf=0.0, cancel=cancel):
            seen.append((ev.stage, ev.t))
            if ev.t == 2:
                cancel.set()
    assert seen == [(1, 1), (1, 2)]
    with pytest.raises(RunCancelled):
        r18.predict([image(3)], cancel=cancel)


@pytest.mark.parametrize("name", ["rcnn-r18-bundled", "rcnn-r18-bundled-sfpn"])
def test_bundled_qann_reproduced_in_float64_on_val_images(name):
    """The bundled (fp16-stored, QAT) Faster R-CNNs, plain and spiking-FPN, loaded in float64 give their QANN's
    detections exactly: converted in float64 (BatchNorms folded in float32 were off by 1e-7), boundary ties
    rounding alike."""
    from detector.data import open_dataset
    from detector.weights import load_detector, load_manifest

    if name not in load_manifest():
        pytest.skip("no bundled weights")
    det = load_detector(name, dtype=torch.float64)
    dataset = open_dataset("bundled", "val")
    images = [dataset.load_image(i) for i in (4, 7)]  # two images where either cause changed the proposals
    expected, got = det.qann_predict(images, conf=0.001, color="rgb"), det.predict(images, conf=0.001, color="rgb")
    for e, g in zip(expected, got, strict=True):
        assert g.settled and torch.equal(e.boxes.cls, g.boxes.cls)
        assert torch.allclose(e.boxes.xyxy, g.boxes.xyxy, atol=1e-6) and torch.allclose(e.boxes.conf, g.boxes.conf,
                                                                                          atol=1e-9)


def test_spiking_fpn_is_exact_and_drives_the_heads_with_spikes(r18, tmp_path):
    """add_spiking_fpn: signed quantizers on the FPN output convs' inputs, the RPN head's inputs (one per level)
    and the RoI features, calibrated; the spiking network still reproduces that QANN exactly (float64), those
    layers take spikes (no dense MACs left in stage 2; in stage 1 only the first conv, on the image), the
    checkpoint loads back as a spiking-FPN model (with or without the FPN convs' quantizers), and the IF
    baseline refuses the signed quantizers by name."""
    from detector.energy import count_macs
    from detector.models.rcnn import add_spiking_fpn, has_spiking_fpn, save_checkpoint
    from detector.quant import SignedClipQuan

    calibration = [[image(5), image(6, 70, 100)]]
    qann = add_spiking_fpn(r18.qann, calibration=calibration)
    assert has_spiking_fpn(qann) and not has_spiking_fpn(r18.qann)  # a copy: the fixture keeps its model
    signed = {p: m for p, m in qann.named_modules() if isinstance(m, SignedClipQuan)}
    assert sorted(signed) == [*(f"backbone.fpn.layer_input_quants.{i}" for i in range(4)),
                              "roi_heads.box_head.input_quant", *(f"rpn.head.input_quants.{i}" for i in range(5))]
    assert all(m.levels == 4 and m.threshold != 1.0 for m in signed.values())  # calibrated (MSE), not the default
    det = SpikingFasterRCNN.from_model(qann).double()
    imgs = [image(0), image(1, 70, 100)]
    s, q = det.internals(imgs, wake=4, sleep="auto"), det.internals(imgs, spiking=False)
    for key in ("objectness", "deltas", "proposals", "class_logits", "box_regression"):
        assert_tree_close(s[key], q[key])
    plain = r18.internals(imgs, wake=4, sleep="auto")
    (p1, p2), (f1, f2) = [r.stats for r in plain["runs"]], [r.stats for r in s["runs"]]
    assert float(p2.analog_macs.sum()) > 0 and float(f2.analog_macs.sum()) == 0
    image_list, _ = det.preprocess(imgs)  # stage 1's only dense MACs: the first conv on the image, in the 4 wake steps
    assert float(f1.analog_macs.sum()) == 4 * count_macs(det.qann.backbone.body.conv1, image_list.tensors)
    assert float(p1.analog_macs.sum()) > 20 * float(f1.analog_macs.sum())
    snn, ann = det.predict(imgs, wake=4, sleep="auto", conf=0.0), det.qann_predict(imgs, conf=0.0)
    for a, b in zip(snn, ann, strict=True):
        assert len(a) > 0 and torch.equal(a.boxes.cls, b.boxes.cls)
        assert_tree_close([a.boxes.xyxy, a.boxes.conf], [b.boxes.xyxy, b.boxes.conf])

    for model in (qann, add_spiking_fpn(r18.qann, fpn_convs=False)):
        path = tmp_path / "sfpn.pt"
        save_checkpoint(path, model.float(), {"arch": "resnet18_fpn", "num_classes": 4, "levels": 4, **SMALL})
        loaded = SpikingFasterRCNN.from_checkpoint(path, dtype=torch.float64)
        assert has_spiking_fpn(loaded.qann)
        assert {p: m.threshold for p, m in loaded.qann.named_modules() if isinstance(m, SignedClipQuan)} == \
            pytest.approx({p: m.threshold for p, m in model.named_modules() if isinstance(m, SignedClipQuan)})
    with pytest.raises(UnsupportedModuleError, match=r"rpn_head\.input_quants\.0 \(SignedClipQuan\)"):
        SpikingFasterRCNN(qann, neuron="if", calibration=[image(5)])


def test_qcfs_refuses_a_spiking_fpn_in_one_line():
    from detector.weights import load_detector

    with pytest.raises(ValueError, match="QCFS neurons fire positive spikes only, and this model has 10 signed"):
        load_detector("rcnn-r18-bundled-sfpn", neuron="qcfs")


def test_a_mask_head_or_a_wrong_class_list_is_refused_not_dropped():
    mask = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                              min_size=64, max_size=96)
    with pytest.raises(ValueError, match="MaskRCNN has a mask head whose outputs would be dropped: use a FasterRCNN"):
        SpikingFasterRCNN.from_model(mask, levels=4)
    qann = build_qann_fasterrcnn("resnet18_fpn", num_classes=4, levels=4, **SMALL)
    with pytest.raises(ValueError, match="2 names for a model with 3 classes"):
        SpikingFasterRCNN.from_model(qann, classes=["a", "b"])
    assert SpikingFasterRCNN.from_model(qann, classes=["a", "b", "c"]).names == {0: "a", 1: "b", 2: "c"}

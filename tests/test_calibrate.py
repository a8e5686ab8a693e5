"""Post-training quantization (detector.calibrate), rounding and per-layer levels, casc quantize, the QAT recipe."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from detector import ClipQuan, convert
from detector.calibrate import mse_threshold, percentile_threshold, quantize, reestimate_batchnorm
from casc.cli import main as casc
from detector.quant import quantizers, to_qann, with_legacy_quant_state
from detector.randnet import random_qann


def _max_error(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a - b).abs().max())
    return max(_max_error(x, y) for x, y in zip(a, b))


def _staircase_mse(z, theta, levels, phi, activation=torch.relu):
    q = ClipQuan(levels, threshold=theta, rounding="round" if phi else "floor")
    return float(((q(z) - activation(z)) ** 2).mean())


def test_rounding_clipquan_is_floor_shifted_by_half_a_step():
    z = torch.linspace(-1, 3, 4001, dtype=torch.float64)
    for levels, theta in ((4, 2.0), (8, 1.5), (1, 0.75)):  # exact in binary: no boundary moves
        rounded = ClipQuan(levels, threshold=theta)(z)
        floored = ClipQuan(levels, threshold=theta, rounding="floor")(z)
        expected_round = theta * torch.clamp(torch.floor(levels * z / theta + 0.5), 0, levels) / levels
        expected_floor = theta * torch.clamp(torch.floor(levels * z / theta), 0, levels) / levels
        torch.testing.assert_close(rounded, expected_round, rtol=0, atol=1e-12)
        torch.testing.assert_close(floored, expected_floor, rtol=0, atol=1e-12)
        # the floor form is biased down by half a step on average inside the range; rounding is not
        inside = (z > 0) & (z < theta)
        step = theta / levels
        assert float((z[inside] - floored[inside]).mean()) == pytest.approx(step / 2, rel=0.05)
        assert abs(float((z[inside] - rounded[inside]).mean())) < 0.02 * step


def test_mse_threshold_beats_percentiles_on_heavy_tailed_activations():
    z = torch.distributions.Exponential(1.0).sample((50_000,)) - 0.3
    for levels in (2, 4, 8):
        best = mse_threshold(z, nn.ReLU(), levels)
        for other in (percentile_threshold(z, 99.9), percentile_threshold(z, 100), 1.0):
            assert _staircase_mse(z, best, levels, 0.5) <= _staircase_mse(z, other, levels, 0.5)
    assert mse_threshold(-torch.rand(100), nn.ReLU(), 4) == 1.0  # a dead activation keeps a valid threshold


def test_signed_mse_threshold_is_the_best_for_a_signed_quantizer():
    """For a SignedClipQuan (FPN outputs: signed, no ReLU) the threshold minimises the error over both signs."""
    from detector.quant import SignedClipQuan

    torch.manual_seed(0)
    z = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    z = torch.where(z < 0, 3 * z, z)  # the negative half wider: a one-sided choice would clip it
    for levels in (2, 4):
        best = mse_threshold(z, nn.Identity(), levels, signed=True)

        def error(theta):
            return float(((SignedClipQuan(levels, theta)(z) - z) ** 2).mean())

        others = (percentile_threshold(z.abs(), 99.9), float(z.abs().max()), 1.0,
                  mse_threshold(z, nn.ReLU(), levels))  # the one-sided optimum, which ignores the negative half
        assert all(error(best) < 0.999 * error(other) for other in others), (levels, best, others)


def test_batchnorm_reestimation_gives_the_statistics_of_the_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), ClipQuan(4)).eval()
    net[1].running_mean.fill_(7.0)
    batches = [torch.rand(4, 3, 8, 8) for _ in range(3)]
    assert reestimate_batchnorm(net, batches) == 1
    conv_out = torch.cat([net[0](b) for b in batches]).detach()
    torch.testing.assert_close(net[1].running_mean, conv_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert not net.training and not net[1].training and net[1].momentum == 0.1


def test_quantize_returns_a_calibrated_copy_with_the_first_layer_at_more_levels():
    torch.manual_seed(0)
    float_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.SiLU(),
                              nn.Conv2d(8, 2, 1)).eval()
    batches = [torch.rand(4, 3, 12, 12) * 3 for _ in range(2)]
    before = {k: v.clone() for k, v in float_net.state_dict().items()}
    qann = quantize(float_net, 4, batches, first_levels=8)
    assert all(torch.equal(v, float_net.state_dict()[k]) for k, v in before.items())  # the float model is untouched
    found = quantizers(qann)
    assert [(p, q.levels, q.rounding) for p, q in found] == [("2", 8, "round"), ("4", 4, "round")]
    assert all(q.threshold != 1.0 for _, q in found)
    with pytest.raises(ValueError, match="already has ClipQuan"):
        quantize(qann, 4, batches)


@pytest.mark.parametrize("rounding", ["round", "floor"])
@pytest.mark.parametrize("first_levels", [None, 8, 2])
def test_rounding_and_per_layer_levels_are_exact_in_both_modes(rounding, first_levels):
    for seed in range(10):
        qann = random_qann(seed, levels=4, depth=10, rounding=rounding, first_levels=first_levels).double()
        x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
        reference = qann(x)
        snn = convert(qann)
        assert snn.levels == max(4, first_levels or 4)  # the wake count a mixed network needs
        for mode in ("step", "multistep"):
            for burst in (1, None):
                run = snn.run(x, sleep="auto", mode=mode, burst=burst, max_sleep=300)
                assert bool(run.settled.all())
                assert _max_error(run.readout, reference) <= 1e-9, (seed, mode, burst)


def test_without_the_precharge_a_rounding_qann_is_not_reproduced():
    broken = 0
    for seed in range(10):
        qann = random_qann(seed, levels=4, depth=8).double()
        x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
        snn = convert(qann)
        for neuron in snn.neurons():
            neuron[1].precharge = 0.0
        broken += _max_error(snn.run(x).readout, qann(x)) > 1e-6
    assert broken >= 8


def test_levels_and_rounding_travel_in_the_state_dict_and_legacy_dicts_load_as_floor():
    source = random_qann(3, levels=4, depth=6, first_levels=8)
    target = random_qann(3, levels=2, depth=6, rounding="floor")
    target.load_state_dict(source.state_dict())
    assert [(q.levels, q.rounding) for _, q in quantizers(target)] == [(q.levels, q.rounding)
                                                                       for _, q in quantizers(source)]
    legacy = {k: v for k, v in source.state_dict().items() if not k.endswith(("quant_levels", "quant_rounding"))}
    fresh = random_qann(3, levels=4, depth=6)
    fresh.load_state_dict(with_legacy_quant_state(fresh, legacy))
    assert {(q.levels, q.rounding) for _, q in quantizers(fresh)} == {(4, "floor")}


def test_to_qann_rejects_unknown_site_levels():
    with pytest.raises(ValueError, match="not activations"):
        to_qann(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()), 4, site_levels={"0": 8})


# --- the detectors ------------------------------------------------------------------------------------------

def test_quantized_bundled_yolo_is_exact_in_float64_with_rounding_and_a_first_layer_at_8(tmp_path):
    from detector.models.yolo import SpikingYOLO, calibration_inputs, load_checkpoint
    from detector.train.quantize import calibration_images
    from detector.weights import resolve

    entry = resolve("yolov8n-bundled-float")
    model, meta = load_checkpoint(entry.path)
    qann = quantize(model, 4, calibration_inputs(calibration_images("bundled", 4), 64, batch=4), first_levels=8)
    det = SpikingYOLO.from_model(qann, names=meta["names"], imgsz=64, dtype=torch.float64)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    run = det.raw(x)
    assert run.wake == 8 and bool(run.settled.all())
    assert _max_error(run.readout, det.qann_raw(x)) <= 1e-9


@pytest.mark.parametrize("name", ["yolov8n-bundled-float", "rcnn-r18-bundled-float"])
def test_casc_quantize_writes_a_qann_checkpoint_that_loads_with_its_quantizers(name, tmp_path):
    from detector.weights import load_detector

    out = tmp_path / "qann.pt"
    code = casc(["quantize", "--model", name, "--data", "bundled", "--images", "4", "--batch", "2", "--levels", "4",
                 "--first-levels", "8", "--out", str(out)])
    assert code == 0 and out.is_file()
    det = load_detector(str(out))
    net = det.qann
    found = quantizers(net)
    assert found[0][1].levels == 8 and {q.levels for _, q in found[1:]} == {4}
    assert {q.rounding for _, q in found} == {"round"} and det.levels == 8


def test_casc_quantize_refuses_a_qann_with_a_clear_error(capsys):
    assert casc(["quantize", "--model", "yolov8n-bundled", "--data", "bundled", "--images", "2",
                 "--out", "/nonexistent/x.pt"]) == 2
    assert "already a QANN" in capsys.readouterr().err


def test_casc_quantize_spiking_fpn_from_a_float_or_a_qann_faster_rcnn(tmp_path, capsys):
    """--spiking-fpn: a float Faster R-CNN is quantized and gets the FPN-output quantizers; a QANN gets only
    those (its own quantizers unchanged); a YOLO model is refused with a clear error."""
    from detector.models.rcnn import has_spiking_fpn
    from detector.quant import SignedClipQuan
    from detector.weights import load_detector

    common = ["--data", "bundled", "--images", "2", "--batch", "2", "--spiking-fpn"]
    for name in ("rcnn-r18-bundled-float", "rcnn-r18-bundled"):
        out = tmp_path / f"{name}-sfpn.pt"
        assert casc(["quantize", "--model", name, *common, "--out", str(out)]) == 0
        net = load_detector(str(out)).qann
        assert has_spiking_fpn(net)
        signed = [q for _, q in quantizers(net) if isinstance(q, SignedClipQuan)]
        assert len(signed) == 4 + 5 + 1 and all(q.threshold != 1.0 for q in signed)  # FPN convs, RPN levels, RoIs
    bundled = {p: q.threshold for p, q in quantizers(load_detector("rcnn-r18-bundled").qann)}
    assert {p: t for p, t in ((p, q.threshold) for p, q in quantizers(net)) if p in bundled} == bundled
    assert casc(["quantize", "--model", "yolov8n-bundled-float", *common, "--out", str(tmp_path / "y.pt")]) == 2
    assert "--spiking-fpn: not an option for yolov8n-bundled-float, a yolo model" in capsys.readouterr().err


@pytest.mark.parametrize("theta", ["learn", "freeze"])
def test_yolo_qat_recipe_trains_thresholds_or_keeps_them(theta, tmp_path):
    from detector.models.yolo import load_checkpoint

    out = tmp_path / "qat"
    code = casc(["train", "yolo", "--qat", "--model", "yolov8n-bundled", "--data", "bundled", "--iterations", "2",
                 "--batch", "2", "--theta", theta, "--save-every", "1", "--lr", "0.01", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["loss"] > 0
    before, _ = load_checkpoint(resolve_path("yolov8n-bundled"))
    after, meta = load_checkpoint(out / "last.pt")
    assert meta["quantized"] and meta["levels"] == 4
    old = [q.threshold for _, q in quantizers(before)]
    new = [q.threshold for _, q in quantizers(after)]
    assert (old != new) if theta == "learn" else (old == new)


def resolve_path(name):
    from detector.weights import resolve

    return resolve(name).path


def test_rcnn_qat_from_a_float_checkpoint_starts_calibrated_and_can_freeze_thresholds(tmp_path):
    from test_rcnn import _coco_fixture

    from detector.models.rcnn import _unwrap_state_dict, load_checkpoint, model_from_state_dict

    data = tmp_path / "coco"
    _coco_fixture(data)
    common = ["train", "rcnn", "--arch", "resnet18_fpn", "--data", str(data), "--epochs", "1", "--batch", "2",
              "--lr", "0.001", "--min-size", "64", "--max-size", "96", "--representation-size", "32", "--workers", "0",
              "--warmup-iters", "2"]
    assert casc(common + ["--float", "--train-bn", "--out", str(tmp_path / "float")]) == 0
    assert casc(common + ["--weights", str(tmp_path / "float" / "last.pt"), "--levels", "4", "--theta", "freeze",
                          "--calibrate-images", "4", "--out", str(tmp_path / "qann")]) == 0
    state, meta = _unwrap_state_dict(load_checkpoint(tmp_path / "qann" / "last.pt"))
    trained = model_from_state_dict(state, meta, levels=None)
    thresholds = [q.threshold for _, q in quantizers(trained)]
    assert all(t != 1.0 for t in thresholds)  # calibrated, not the old theta = 1 start
    # frozen: what calibration chose on the same images, untouched by the epoch of training
    from detector.data import open_dataset
    from detector.models.rcnn import calibration_inputs

    fstate, fmeta = _unwrap_state_dict(load_checkpoint(tmp_path / "float" / "last.pt"))
    start = model_from_state_dict(fstate, fmeta, levels=None)
    ds = open_dataset(f"coco:{data}", "train")
    images = [ds.load_image(i) for i in range(min(4, len(ds)))]
    expected = [q.threshold for _, q in quantizers(quantize(start, 4, calibration_inputs(images)))]
    assert thresholds == pytest.approx(expected, rel=1e-6)


def test_rcnn_parameter_groups_put_thresholds_apart_without_decay():
    from detector.train.rcnn import parameter_groups

    net = nn.Sequential(nn.Conv2d(1, 2, 3), ClipQuan(4, 2.0), nn.Conv2d(2, 1, 1))
    groups = parameter_groups(net, "learn", 1e-4)
    assert [len(g["params"]) for g in groups] == [4, 1] and groups[1]["weight_decay"] == 0.0
    assert len(parameter_groups(net, "freeze", 1e-4)) == 1 and not net[1].learnable


def test_a_learnt_threshold_never_falls_to_zero():
    from detector.train.rcnn import parameter_groups
    from detector.train.recipe import MIN_THRESHOLD, keep_thresholds_positive

    net = nn.Sequential(nn.Conv2d(1, 2, 3), ClipQuan(4, 0.01), nn.Conv2d(2, 1, 1))
    optimizer = torch.optim.SGD(parameter_groups(net, "learn", 0.0), lr=10.0)
    keep_thresholds_positive(optimizer)
    net[1].threshold_param.grad = torch.tensor(1.0)  # a step of -10 from 0.01
    optimizer.step()
    assert net[1].threshold == pytest.approx(MIN_THRESHOLD)


def test_quantizing_a_silu_model_warns_that_the_if_baseline_needs_relu(capsys):
    from detector.train.yolo import warn_if_silu

    warn_if_silu("silu")
    assert "IF baseline converts ReLU networks only" in capsys.readouterr().err
    warn_if_silu("relu")
    assert capsys.readouterr().err == ""

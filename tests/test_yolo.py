"""Ultralytics YOLO adapter: exactness on real graphs, checkpoints, training CLI, predict/stream, errors.

Random-init networks get randomised BatchNorm statistics (so activations are spread over the levels)
and randomised class biases (so there are detections above ``conf`` to compare).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

yolo = pytest.importorskip("detector.models.yolo")
yolo.prepare_ultralytics()  # offline, before ultralytics is imported

from detector import ClipQuan  # noqa: E402
from detector.models.yolo import (  # noqa: E402
    SpikingYOLO, UnsupportedModelError, build_qann, export_checkpoint, load_checkpoint,
)
from detector.neurons import Neuron  # noqa: E402
from detector.pooling import LIPool  # noqa: E402
from detector.randnet import randomise_batchnorm, randomise_class_biases  # noqa: E402
from detector.weights import sha256_of  # noqa: E402

ASSETS = Path(__import__("ultralytics").__file__).parent / "assets"
PHOTOS = [ASSETS / "bus.jpg", ASSETS / "zidane.jpg"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread BN statistics and the class biases so a random-init net has mid-level activations and boxes."""
    randomise_batchnorm(model, seed)
    randomise_class_biases([seq[-1] for seq in model.model[-1].cv3], seed + 1, -2.0, 1.0)
    return model


def _max_err(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _same(d1, d2) -> bool:
    return (torch.equal(d1.boxes.xyxy, d2.boxes.xyxy) and torch.equal(d1.boxes.conf, d2.boxes.conf)
            and torch.equal(d1.boxes.cls, d2.boxes.cls))


# --- exactness on real Ultralytics graphs ----------------------------------------------------------------

@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolov5nu.yaml"])
def test_exact_readouts_and_detections_float64(cfg):
    qann = randomize(build_qann(cfg, levels=4, act="relu"), seed=1)
    det = SpikingYOLO.from_model(qann, imgsz=64, dtype=torch.float64)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = det.qann_raw(x)
    # the readout net is the DetectionModel's own graph: same raw head outputs as Ultralytics' forward
    _, preds = det.qann(x)
    reg = 4 * det.decoder.reg_max
    assert torch.equal(preds["boxes"], torch.cat([m[:, :reg].flatten(2) for m in ref], -1))
    assert torch.equal(preds["scores"], torch.cat([m[:, reg:].flatten(2) for m in ref], -1))

    for mode in ("step", "multistep"):
        run = det.raw(x, wake=4, sleep="auto", mode=mode)
        out = run.readout
        assert _max_err(out, ref) <= 1e-6, mode
        assert bool(run.settled.all()) and run.wake == 4
    # the paper's one spike per sleep step is exact too, and needs no fewer steps than burst sleep
    single = det.raw(x, wake=4, sleep="auto", burst=1)
    assert _max_err(single.readout, ref) <= 1e-6 and bool(single.settled.all())
    assert bool((single.steps >= run.steps).all())
    snn_dets = det.decode(out, conf=0.05)
    qann_dets = det.decode(ref, conf=0.05)
    assert sum(len(d) for d in qann_dets) > 0, "randomised head should give detections to compare"
    assert all(_same(a, b) for a, b in zip(snn_dets, qann_dets))
    # and through the public predict / qann_predict path (tensor input)
    p, q = det.predict(x, conf=0.05), det.qann_predict(x, conf=0.05)
    assert all(_same(a, b) for a, b in zip(p, q))
    assert all(d.steps >= 4 and d.spikes > 0 and d.energy_uj > 0 and d.settled for d in p)
    again = det.raw(x)  # predict's schedule: step mode, burst = wake
    assert [d.steps for d in p] == again.steps.tolist() == run.steps.tolist()
    assert [d.spikes for d in p] == again.stats.spikes.tolist()
    assert [d.energy_uj for d in p] == pytest.approx((again.stats.energy_pj * 1e-6).tolist())


def test_yolo11_hybrid_exact_and_reported():
    qann = randomize(build_qann("yolo11n.yaml", levels=4, act="relu"), seed=2)
    with pytest.raises(UnsupportedModelError, match=r"attn"):
        SpikingYOLO.from_model(qann, imgsz=64, dtype=torch.float64)
    det = SpikingYOLO.from_model(qann, imgsz=64, dtype=torch.float64, analog="auto")
    assert det.analog and all(p.endswith("attn") for p in det.analog)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = det.qann_raw(x)
    run = det.raw(x, wake=4, sleep="auto")
    out = run.readout
    assert _max_err(out, ref) <= 1e-6 and bool(run.settled.all())
    fraction = run.stats.analog_mac_fraction
    # independently: the conv/linear MACs inside the islands over those of one QANN forward
    from contextlib import ExitStack

    from detector.energy import MacCounter

    with ExitStack() as stack:
        whole = stack.enter_context(MacCounter(det.readout_net))
        islands = [stack.enter_context(MacCounter(det.readout_net.get_submodule(p))) for p in det.analog]
        det.readout_net(x)
    assert 0.0 < fraction < 1.0
    assert fraction == pytest.approx(sum(c.macs for c in islands) / whole.macs, rel=1e-9)
    assert not hasattr(det, "analog_mac_fraction")
    assert all(_same(a, b) for a, b in zip(det.decode(out, conf=0.05), det.decode(ref, conf=0.05)))


# --- SiLU float checkpoint -> QANN, and one neuron state per call site ---------------------------------------

def test_silu_float_checkpoint_to_qann(tmp_path):
    from ultralytics.nn.modules import Conv

    float_model = build_qann("yolov8n.yaml", act="silu", quantize=False)
    silu = [m for m in float_model.modules() if isinstance(m, nn.SiLU)]
    assert silu and not any(isinstance(m, ClipQuan) for m in float_model.modules())
    path = export_checkpoint(float_model, tmp_path / "float.pt", imgsz=64)
    raw = torch.load(path, weights_only=True)
    assert raw["levels"] is None and raw["act"] == "silu"
    with pytest.raises(ValueError, match="levels"):
        SpikingYOLO.from_checkpoint(path)
    det = SpikingYOLO.from_checkpoint(path, levels=4, dtype=torch.float64)
    quants = [m for m in det.qann.modules() if isinstance(m, ClipQuan)]
    convs = [m for m in float_model.modules() if isinstance(m, Conv) and not isinstance(m.act, nn.Identity)]
    assert not any(isinstance(m, nn.SiLU) for m in det.qann.modules())
    assert len(quants) == len(convs) and len({id(q) for q in quants}) == len(quants)
    assert all(q.levels == 4 for q in quants)
    randomize(det.qann)
    det = SpikingYOLO.from_model(det.qann, imgsz=64, dtype=torch.float64)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert _max_err(det.raw(x).readout, det.qann_raw(x)) <= 1e-6


def test_shared_default_activation_gets_one_state_per_call_site():
    """Ultralytics builds every Conv with the same ``Conv.default_act`` object: the trap."""
    float_model = build_qann("yolov8n.yaml", act="relu", quantize=False)
    acts = [m.act for m in float_model.modules() if hasattr(m, "bn") and not isinstance(m.act, nn.Identity)]
    assert len({id(a) for a in acts}) < len(acts), "expected Ultralytics to share its default activation"

    qann = randomize(build_qann(float_model, levels=4))
    det = SpikingYOLO.from_model(qann, imgsz=64, dtype=torch.float64)
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(id(m)))
             for m in det.readout_net.modules() if isinstance(m, ClipQuan)]
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    det.qann_raw(x)
    for h in hooks:
        h.remove()
    assert len(set(calls)) == len(calls), "each ClipQuan is called once per forward: one module per call site"
    det.raw(x)
    neurons = [m for _, m in det.snn.neurons()]
    states = [m.call_sites for m in neurons]
    # a shared neuron object would hold several states (or fewer total states than call sites)
    assert sum(states) == len(calls) and set(states) == {1}
    assert len({id(s[0]) for m in neurons for s in m._states}) == len(calls)  # distinct membranes
    pools = [m for m in det.snn.model.modules() if isinstance(m, LIPool)]
    assert len(pools) == 1 and pools[0].call_sites == 3  # SPPF applies one max-pool three times
    assert all(isinstance(m, Neuron) for m in neurons)


# --- predict / stream on real photos ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_detector():
    torch.set_num_threads(1)
    qann = randomize(build_qann("yolov8n.yaml", levels=4, act="relu"), seed=4)
    return SpikingYOLO.from_model(qann, imgsz=128, names=[f"c{i}" for i in range(80)])


def test_predict_real_photos_boxes_inside(photo_detector):
    import cv2

    det = photo_detector
    results = det.predict([str(p) for p in PHOTOS], conf=0.05)
    assert len(results) == 2
    for photo, r in zip(PHOTOS, results):
        h, w = cv2.imread(str(photo)).shape[:2]
        assert r.orig_shape == (h, w)
        assert len(r) > 0
        b = r.boxes.xyxy
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert r.boxes.cls.dtype == torch.int64 and r.steps >= 4 and r.spikes > 0 and r.energy_uj > 0
        assert r.stage_steps is None and r.settled is True and r.path == str(photo)
        assert all(isinstance(n, str) for n in r.labels) and r.to_dict()["detections"][0]["name"].startswith("c")
    # same image as path, BGR numpy, RGB numpy, PIL: same detections
    from PIL import Image

    bgr = cv2.imread(str(PHOTOS[1]))
    variants = [det.predict(bgr, conf=0.05)[0], det.predict(np.ascontiguousarray(bgr[..., ::-1]), conf=0.05,
                                                            color="rgb")[0],
                det.predict(Image.fromarray(bgr[..., ::-1]), conf=0.05)[0]]
    assert all(_same(v, results[1]) for v in variants)


def test_stream_events_in_order_and_final_equals_predict(photo_detector):
    det = photo_detector
    events = list(det.stream(str(PHOTOS[0]), conf=0.05))
    final = det.predict(str(PHOTOS[0]), conf=0.05)[0]
    assert [e.t for e in events] == list(range(1, len(events) + 1))
    phases = [e.phase for e in events]
    assert phases[:4] == ["wake"] * 4 and set(phases[4:]) <= {"sleep"}
    assert [e.wake for e in events][:4] == [1, 2, 3, 4]
    assert events[-1].settled and not any(e.settled for e in events[:4])
    assert len(events) == final.steps
    assert _same(events[-1].detections, final)
    cumulative = np.cumsum([e.spikes for e in events])
    assert np.allclose(cumulative, [e.cumulative_spikes for e in events])
    assert events[-1].cumulative_spikes == pytest.approx(final.spikes)
    assert events[-1].detections.energy_uj == pytest.approx(final.energy_uj)
    assert [e.final for e in events] == [False] * (len(events) - 1) + [True]
    assert final.settled is True and events[-1].detections.settled is True and events[-1].detections.steps == final.steps


def test_cancel_stops_stream_and_predict(photo_detector):
    import threading

    from detector.runtime import RunCancelled

    det = photo_detector
    cancel = threading.Event()
    seen = []
    with pytest.raises(RunCancelled):
        for event in det.stream(str(PHOTOS[0]), conf=0.05, cancel=cancel):
            seen.append(event.t)
            if event.t == 2:
                cancel.set()
    assert seen == [1, 2]  # nothing after the event that set it
    with pytest.raises(RunCancelled):
        det.predict(str(PHOTOS[0]), conf=0.05, cancel=cancel)


# --- training CLI end to end (offline) -------------------------------------------------------------------

def _tiny_dataset(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((64, 64, 3), 40, np.uint8)
            lines = []
            for _ in range(2):
                c = int(rng.integers(0, 2))
                w, h = (int(v) for v in rng.integers(12, 28, 2))
                x0, y0 = int(rng.integers(0, 64 - w)), int(rng.integers(0, 64 - h))
                img[y0:y0 + h, x0:x0 + w] = (220, 60, 60) if c == 0 else (60, 220, 60)
                lines.append(f"{c} {(x0 + w / 2) / 64:.6f} {(y0 + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}")
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n")
    return data


@pytest.mark.slow
def test_casc_train_yolo_end_to_end(tmp_path, capsys):
    from ultralytics import YOLO

    from casc.cli import main

    data = _tiny_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    code = main(["train", "yolo", "--model", "yolov8n.yaml", "--data", str(data), "--levels", "4", "--epochs", "1",
                 "--imgsz", "64", "--batch", "4", "--device", "cpu", "--act", "relu", "--out", str(out),
                 "--workers", "0", "--no-plots"])
    assert code == 0
    ckpt = Path(capsys.readouterr().out.strip().splitlines()[-1].split("checkpoint: ")[-1])
    assert ckpt.is_file() and ckpt.parent == out / "weights"
    # Ultralytics' own loader gets the same QANN back
    umodel = YOLO(str(ckpt)).model
    quants = [m for m in umodel.modules() if isinstance(m, ClipQuan)]
    assert quants and {q.levels for q in quants} == {4}
    assert not any(isinstance(m, (nn.ReLU, nn.SiLU)) for m in umodel.modules())
    # `yolo val`-style validation of the QANN through Ultralytics
    metrics = YOLO(str(ckpt)).val(data=str(data), imgsz=64, batch=2, workers=0, device="cpu", plots=False,
                                  verbose=False, project=str(tmp_path / "val"), name="v")
    assert 0.0 <= float(metrics.box.map50) <= 1.0
    model, meta = load_checkpoint(ckpt)
    assert meta["levels"] == 4 and meta["act"] == "relu" and meta["names"] == {0: "red", 1: "green"}
    safe = ckpt.with_suffix(".casc.pt")
    raw = torch.load(safe, weights_only=True)
    assert raw["levels"] == 4 and raw["names"] == ["red", "green"] and raw["imgsz"] == 64
    model2, _ = load_checkpoint(safe)
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k].float(), sd2[k].float()) for k in sd)
    # convert and predict from the written checkpoint
    det = SpikingYOLO.from_checkpoint(ckpt)
    assert det.imgsz == 64 and det.names == {0: "red", 1: "green"}
    image = str(tmp_path / "ds" / "images" / "val" / "0.png")
    r = det.predict(image, conf=0.001)[0]
    assert r.steps >= 4 and r.orig_shape == (64, 64)
    q = det.qann_predict(image, conf=0.001)[0]
    assert len(r) == len(q)


# --- errors and offline setup ----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ["yolov8n-seg.yaml", "yolov8n-pose.yaml", "rtdetr-l.yaml", "yolov8s-worldv2.yaml",
                                 "yolo26n.yaml", "yolov10n.yaml", "yolov9t.yaml"])
def test_unsupported_family_clear_error(cfg):
    with pytest.raises(UnsupportedModelError, match="supported"):
        build_qann(cfg, levels=4)


def test_missing_paths_and_bad_sha256(tmp_path):
    with pytest.raises(FileNotFoundError):
        SpikingYOLO.from_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        build_qann(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        build_qann(tmp_path / "nope.yaml")
    qann = build_qann("yolov8n.yaml", levels=2, act="relu", nc=3)
    path = export_checkpoint(qann, tmp_path / "q.pt", names=["a", "b", "c"], imgsz=64)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        SpikingYOLO.from_checkpoint(path, sha256="0" * 64)
    det = SpikingYOLO.from_checkpoint(path, sha256=sha256_of(path))
    assert det.levels == 2 and det.names == {0: "a", 1: "b", 2: "c"} and det.imgsz == 64
    with pytest.raises(FileNotFoundError):
        det.predict(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="act"):
        build_qann("yolov8n.yaml", act="gelu")


class _Payload:
    """A pickle that runs a command when unpickled, as a hostile ``.pt`` file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _ultralytics_pt(path: Path) -> Path:
    """A checkpoint as Ultralytics' trainer writes one: the model object (fp16), train args, NumPy metrics."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.args = IterableSimpleNamespace(imgsz=64)
    model.names = {0: "a", 1: "b", 2: "c"}
    torch.save({"epoch": 1, "best_fitness": np.float64(0.5), "model": None, "ema": model.half(), "updates": 3,
                "train_args": {"imgsz": 64, "data": "data.yaml"}, "train_metrics": {"map50": np.float64(0.1)},
                "date": "2026-01-01", "version": "8.4"}, path)
    return path


def test_ultralytics_pt_files_load_under_the_allowlist_and_payloads_never_run(tmp_path):
    import pickle

    from detector.models.yolo.pt_files import UnsafeCheckpoint, allowed_global

    model, meta = load_checkpoint(_ultralytics_pt(tmp_path / "u.pt"))
    assert meta["format"] == "ultralytics" and meta["imgsz"] == 64 and meta["names"] == {0: "a", 1: "b", 2: "c"}
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    marker = tmp_path / "ran"
    zipped = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, zipped)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    for path in (zipped, plain):
        with pytest.raises(UnsafeCheckpoint) as refused:
            load_checkpoint(path)
        message = str(refused.value)
        assert "\n" not in message and "posix.system" in message and "refused" in message, message
    assert not marker.exists(), "the payload ran"
    # the trainer is handed a re-saved copy of what load_checkpoint read, never the file itself
    start = yolo.ultralytics_start_checkpoint(load_checkpoint(tmp_path / "u.pt")[0], tmp_path / "run" / "start.pt")
    assert start.parent == tmp_path / "run" and load_checkpoint(start)[1]["imgsz"] == 640  # re-saved, args dropped
    assert allowed_global("ultralytics.nn.modules.conv.Conv") is not None
    for name in ("posix.system", "builtins.eval", "subprocess.Popen", "ultralytics.utils.checks.check_requirements",
                 "torch.nn.modules.module._global_forward_hooks", "detector.checkpoint.save"):
        assert allowed_global(name) is None, name


def test_offline_environment():
    from ultralytics.utils import USER_CONFIG_DIR, checks

    import ultralytics.utils as uutils

    assert os.environ.get("YOLO_OFFLINE")
    assert (Path(USER_CONFIG_DIR) / "Arial.ttf").is_file()
    assert uutils.ONLINE is False and checks.ONLINE is False
    assert checks.AUTOINSTALL is False or "YOLO_AUTOINSTALL" in os.environ


_IMPORT_THEN_PREPARE = """
import os, sys
from pathlib import Path
root, before = Path(sys.argv[1]), dict(os.environ)
import detector, detector.models, detector.models.yolo as yolo
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert "ultralytics" not in sys.modules
assert not [p for p in root.rglob("*") if p.is_file()], "files written at import"
yolo.prepare_ultralytics()
assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "false"
assert Path(os.environ["YOLO_CONFIG_DIR"]).is_relative_to(root / "cache")
assert (Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf").is_file()
import ultralytics.utils as uutils
assert uutils.ONLINE is False and uutils.checks.AUTOINSTALL is False
"""


def test_importing_the_adapter_changes_nothing_until_prepare_ultralytics(tmp_path):
    """``import detector.models.yolo`` sets no variable, writes no file and does not import Ultralytics;
    ``prepare_ultralytics()`` sets the offline environment before Ultralytics is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    for name in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        env[name] = str(tmp_path / name.lower())
        Path(env[name]).mkdir()
    env["CASC_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", _IMPORT_THEN_PREPARE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# --- anytime evaluation and the IF baseline ---------------------------------------------------------------

def test_detections_at_steps_past_settling_equal_predict():
    qann = randomize(build_qann("yolov8n.yaml", levels=4, act="relu"), seed=2)
    det = SpikingYOLO.from_model(qann, imgsz=64, dtype=torch.float64)
    images = [np.random.default_rng(i).integers(0, 255, (48, 80, 3), dtype=np.uint8) for i in range(2)]
    wanted = [1, 4, 5, 200]
    results, info = det.detections_at_steps(images, wanted, conf=0.001)
    assert sorted(results) == wanted and max(info["steps"]) < 200 and all(info["settled"])
    expected = det.predict(images, conf=0.001)
    assert all(_same(a, b) for a, b in zip(results[200], expected))
    assert info["steps"] == [d.steps for d in expected] and info["settled"] == [d.settled for d in expected]
    assert sorted(info["energy_uj_at"]) == wanted
    assert info["energy_uj_at"][200] == pytest.approx(info["energy_uj"])
    assert info["energy_uj"] == pytest.approx([d.energy_uj for d in expected], rel=1e-9)
    for i in range(2):  # non-decreasing in t, per image, and each image's detections carry their figure
        at = [info["energy_uj_at"][t][i] for t in wanted]
        assert all(0 < e1 <= e2 for e1, e2 in zip(at, at[1:])), at
        assert [results[t][i].energy_uj for t in wanted] == at
        assert [results[t][i].steps for t in wanted] == [min(t, info["steps"][i]) for t in wanted]
    # energy, spikes and settled at t are those of the first t streamed steps
    x, _ = det.preprocess(images)
    events = list(det.snn.stream(x))
    for t in wanted:
        assert info["energy_uj_at"][t] == pytest.approx((sum(e.energy_pj for e in events[:t]) * 1e-6).tolist())
        spikes = sum(e.spikes for e in events[:t]).tolist()
        settled = events[min(t, len(events)) - 1].settled.tolist()
        for i in range(2):
            assert results[t][i].spikes == pytest.approx(spikes[i]) and results[t][i].settled is settled[i]
    assert [d.spikes for d in results[200]] == pytest.approx([d.spikes for d in expected])
    assert not any(d.settled for d in results[1]) and all(d.settled for d in results[200])


def test_if_baseline_converges_to_the_float_ann_as_steps_grow():
    from detector.models.yolo import letterbox

    float_model = randomize(build_qann("yolov8n.yaml", quantize=False, act="relu"), seed=3)
    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(2)]
    calibration = [letterbox(images, 64)[0]]
    baseline = SpikingYOLO.from_model(float_model, imgsz=64, neuron="if", calibration=calibration)
    x, _ = baseline.preprocess(images)
    reference = baseline.qann_raw(x)  # for the IF baseline: the float ANN it came from
    errors = [_max_err(baseline.raw(x, wake=t, sleep=0).readout, reference) for t in (4, 64)]
    assert errors[1] < errors[0]
    results, info = baseline.detections_at_steps(images, [2, 8])
    assert sorted(results) == [2, 8] and info["steps"] == [8, 8]
    with pytest.raises(ValueError, match="IF baseline"):
        SpikingYOLO.from_model(float_model, imgsz=64, neuron="if")


def test_a_class_name_list_of_the_wrong_length_is_refused():
    qann = build_qann("yolov8n.yaml", levels=4, act="relu", nc=3)
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes: give one name per class id 0..2"):
        SpikingYOLO.from_model(qann, names=["a", "b"], imgsz=64)
    assert SpikingYOLO.from_model(qann, names=["a", "b", "c"], imgsz=64).names == {0: "a", 1: "b", 2: "c"}

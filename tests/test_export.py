"""ONNX export of the spiking step and the ONNX Runtime engine (detector/export/).

Export: graphs pass onnx.checker, one exported step equals one step of the converted module tree, the
update of the runtime's own neurons is what lands in the graph, ``casc export`` writes the QANN and
step graphs of both bundled detectors. Engine: its schedule equals the PyTorch runtime's on random
nets (float32: ONNX Runtime's CPU provider has no float64 Conv, so boundary flips are counted) and
gives the bundled YOLOv8n's and Faster R-CNN's detections at ``sleep="auto"``."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from casc.cli import main as casc
from detector.convert import convert
from detector.export import OrtSpikingNetwork, SpikingStep, StepExportError, export_steps
from detector.export.engine import execution_providers
from detector.export.step import describe, tracing
from detector.neurons import CIFNeuron
from detector.quant import ClipQuan
from detector.randnet import random_qann
from detector.runtime import RunCancelled
from detector.weights import load_detector, load_manifest


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_step_graphs_have_the_states_as_inputs_and_outputs(tmp_path):
    snn = convert(random_qann(0, depth=6))
    info = export_steps(snn, torch.zeros(2, 3, 16, 16), tmp_path, "snn")
    n_states, n_readouts = len(info["state_names"]), len(info["readout_shapes"])
    assert n_states == 2 * len(snn.neurons()) + sum(2 for m in snn.stateful if m.kind == "lipool")
    for variant, graph in info["graphs"].items():
        model = onnx.load(str(tmp_path / graph["file"]))
        onnx.checker.check_model(model, full_check=True)
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        assert inputs == graph["inputs"] and outputs == graph["outputs"]
        scalars = {"first": [], "wake": ["k"], "sleep": ["k", "burst"]}[variant]
        states = [] if variant == "first" else n_states + n_readouts
        assert inputs[0] == "x" and inputs[1:1 + len(scalars)] == scalars
        assert len(inputs) == 1 + len(scalars) + (states or 0)
        assert len(outputs) == n_states + 2 * n_readouts + 1 and outputs[-1] == "active"


def _eager_schedule(snn, layout, x, wake, sleeps):
    """The step functions run eagerly: (states after each step) for the first, wake and sleep steps."""
    steps = {v: SpikingStep(snn, v, layout) for v in ("first", "wake", "sleep")}
    k = torch.tensor(float(wake))
    out = [steps["first"](x)]
    for step in range(2, wake + 1):
        out.append(steps["wake"](x, torch.tensor(float(step)), *out[-1][:-1 - len(layout.readout_shapes)]))
    for _ in range(sleeps):
        out.append(steps["sleep"](torch.zeros_like(x), k, k, *out[-1][:-1 - len(layout.readout_shapes)]))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_exported_steps_equal_the_module_tree_step_by_step(tmp_path, seed):
    """Each graph, fed the eager states, returns the eager step's states, totals, increments and activity."""
    snn = convert(random_qann(seed, depth=8))
    x = torch.rand(2, 3, 16, 16)
    info = export_steps(snn, x, tmp_path, "snn")
    sessions = {v: _session(tmp_path / g["file"]) for v, g in info["graphs"].items()}
    with tracing(snn), torch.no_grad():
        layout = describe(snn, x)
        eager = _eager_schedule(snn, layout, x, wake=4, sleeps=2)
    n_carried = len(layout.state_names) + len(layout.readout_shapes)
    for t, expected in enumerate(eager):
        variant = "first" if t == 0 else "wake" if t < 4 else "sleep"
        feed = {"x": x.numpy() if variant != "sleep" else np.zeros_like(x.numpy())}
        if variant != "first":
            feed["k"] = np.array(t + 1 if variant == "wake" else 4, np.float32)
            feed.update({name: s.numpy() for name, s in zip(info["graphs"][variant]["inputs"][-n_carried:],
                                                            eager[t - 1][:n_carried])})
            if variant == "sleep":
                feed["burst"] = np.array(4, np.float32)
        got = sessions[variant].run(None, feed)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-5, err_msg=f"step {t + 1} ({variant})")


class _MarkedCIF(CIFNeuron):
    """A CIF neuron whose update differs (every spike doubled): the graph must follow the module."""

    def update(self, state, current, theta, k, sleep):
        return 2 * super().update(state, current, theta, k, sleep)

    def first_update(self, current, theta, k, sleep):
        state, spikes = super().first_update(current, theta, k, sleep)
        return state, 2 * spikes


def test_the_graph_runs_the_neurons_own_update(tmp_path):
    torch.manual_seed(0)  # an unseeded net may emit no spike in its first step, which doubling leaves unchanged
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 2, 1)).eval()
    x = 4 * torch.rand(1, 3, 8, 8)
    outputs = []
    for factory in (CIFNeuron, _MarkedCIF):
        snn = convert(net, neuron=lambda theta, f=factory: f(theta))
        info = export_steps(snn, x, tmp_path, factory.__name__)
        readout = _session(tmp_path / info["graphs"]["first"]["file"]).run(None, {"x": x.numpy()})[-2]
        with tracing(snn), torch.no_grad():
            eager = SpikingStep(snn, "first", describe(snn, x))(x)[-2]
        np.testing.assert_allclose(readout, eager.numpy(), atol=1e-5)
        outputs.append(readout)
    assert not np.allclose(outputs[0], outputs[1])


class _BatchMixingReadout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.head(self.act(self.conv(x))).sum(0)  # readout without a batch axis


def test_readout_without_batch_axis_is_refused_by_name(tmp_path):
    snn = convert(_BatchMixingReadout().eval())
    with pytest.raises(StepExportError, match="snn: readout 0 has shape"):
        export_steps(snn, torch.rand(2, 3, 8, 8), tmp_path, "snn")


class _NoOnnxOp(nn.Module):
    def forward(self, x):
        return torch.special.erfcx(x)  # no ONNX symbolic


def test_unexportable_operator_is_refused_naming_its_module(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 4, 1), _NoOnnxOp(),
                        nn.Conv2d(4, 2, 1)).eval()
    snn = convert(net, analog=["3"])
    with pytest.raises(StepExportError, match=r"snn first step: cannot be exported to ONNX \(in 3.module\).*erfcx"):
        export_steps(snn, torch.zeros(1, 3, 8, 8), tmp_path, "snn")


def test_export_leaves_the_pytorch_runtime_as_it_was(tmp_path):
    snn = convert(random_qann(3, depth=6))
    x = torch.rand(2, 3, 16, 16)
    before = snn.run(x, sleep="auto")
    export_steps(snn, x, tmp_path, "snn")
    after = snn.run(x, sleep="auto")
    assert snn.sim.event_driven and after.stats is not None
    assert torch.equal(before.steps, after.steps)
    for a, b in zip(torch.utils._pytree.tree_leaves(before.readout), torch.utils._pytree.tree_leaves(after.readout)):
        assert torch.equal(a, b)


needs_bundled = pytest.mark.skipif(not load_manifest(), reason="no bundled weights")


@pytest.fixture(scope="module")
def yolo_export(tmp_path_factory):
    """``casc export`` of the bundled YOLOv8n for batch 2 (one export serves every test below)."""
    out = tmp_path_factory.mktemp("yolo-onnx")
    assert casc(["export", "--model", "yolov8n-bundled", "--format", "onnx", "--batch", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def rcnn_export(tmp_path_factory):
    """``casc export`` of the bundled spiking-FPN Faster R-CNN (batch 1: stage 2 takes up to 1000 RoIs; its signed
    neurons traced into the graphs)."""
    out = tmp_path_factory.mktemp("rcnn-onnx")
    assert casc(["export", "--model", "rcnn-r18-bundled-sfpn", "--format", "onnx", "--out", str(out)]) == 0
    return out


@needs_bundled
@pytest.mark.parametrize("model, networks", [("yolov8n-bundled", ["snn"]), ("rcnn-r18-bundled-sfpn", ["stage1", "stage2"])])
def test_casc_export_writes_checked_graphs(capsys, request, model, networks):
    tmp_path = request.getfixturevalue("yolo_export" if model.startswith("yolo") else "rcnn_export")
    print(*(p.name for p in tmp_path.glob("*.onnx")))  # the fixture's own output went to its capture
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["family"] == ("yolo" if model.startswith("yolo") else "rcnn")
    assert sorted(manifest["networks"]) == networks
    files = [g["file"] for g in manifest["qann"].values()]
    files += [g["file"] for net in manifest["networks"].values() for g in net["graphs"].values()]
    assert len(files) == len(networks) * 4
    printed = capsys.readouterr().out
    for name in files:
        assert name in printed
        onnx.checker.check_model(str(tmp_path / name), full_check=True)
    assert not list(tmp_path.glob("*.data"))  # every graph is one self-contained file


# --- the ONNX Runtime engine ---------------------------------------------------------------------

def _leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


def _readout_error(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(_leaves(a.readout), _leaves(b.readout)))


NETS = 12


def test_engine_schedule_equals_the_pytorch_runtime_on_random_nets(tmp_path):
    """float32 both sides; a net whose readouts differ beyond float noise is a boundary flip (summation
    order differs between the engines' convolutions), counted and bounded, never hidden."""
    flips, compared = [], 0
    for seed in range(NETS):
        snn = convert(random_qann(seed, depth=8))
        x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        folder = tmp_path / str(seed)
        folder.mkdir()
        engine = OrtSpikingNetwork(folder, export_steps(snn, torch.zeros(4, 3, 16, 16), folder, "snn"), threads=1)
        for schedule in ({"sleep": "auto"}, {"sleep": 3, "burst": 1}):
            expected, got = snn.run(x, record=False, **schedule), engine.run(x, **schedule)
            compared += 1
            assert got.wake == expected.wake == snn.levels
            if _readout_error(expected, got) > 1e-4:
                flips.append((seed, schedule, _readout_error(expected, got)))
                continue
            assert torch.equal(got.steps, expected.steps) and torch.equal(got.settled, expected.settled)
    print(f"float32 boundary flips: {len(flips)} of {compared} runs {flips}")
    assert len(flips) <= compared // 10, flips


def test_engine_runs_signed_neurons_like_the_pytorch_runtime(tmp_path):
    """Signed quantizers (the spiking FPN's) are traced into the graphs with the runtime's own update: the engine's
    counts go below zero as the runtime's do (test_exactness shows the unsigned bound breaks these nets)."""
    signed_nets = 0
    for seed in range(6):
        qann = random_qann(100 + seed, depth=8, signed=0.5)
        signed_nets += any(getattr(m, "signed", False) for m in qann.modules())
        snn = convert(qann)
        x = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) - 0.5) * 4
        folder = tmp_path / str(seed)
        folder.mkdir()
        engine = OrtSpikingNetwork(folder, export_steps(snn, torch.zeros(3, 3, 16, 16), folder, "snn"), threads=1)
        expected, got = snn.run(x, record=False), engine.run(x)
        assert _readout_error(expected, got) <= 1e-4, seed
        assert torch.equal(got.steps, expected.steps) and torch.equal(got.settled, expected.settled)
    assert signed_nets >= 5


def test_engine_runs_analog_islands_and_lipool(tmp_path):
    """An island's state (cumulative input, previous output) and a LIPool's are carried like a neuron's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 4, 1), nn.Sigmoid(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)).eval()
    snn = convert(net, analog=["3"])
    info = export_steps(snn, torch.zeros(2, 3, 8, 8), tmp_path, "snn")
    assert info["state_names"] == ["1[0]", "1[1]", "3[0]", "3[1]", "4[0]", "4[1]"]
    x = torch.rand(2, 3, 8, 8)
    expected, got = snn.run(x, record=False), OrtSpikingNetwork(tmp_path, info, threads=1).run(x)
    assert torch.allclose(got.readout, expected.readout, atol=1e-5) and torch.equal(got.steps, expected.steps)
    assert torch.allclose(got.readout, net(x), atol=1e-5)


def test_engine_pads_a_short_batch_slices_a_long_one_and_refuses_other_shapes(tmp_path):
    snn = convert(random_qann(5, depth=6))
    engine = OrtSpikingNetwork(tmp_path, export_steps(snn, torch.zeros(4, 3, 16, 16), tmp_path, "snn"), threads=1)
    x = torch.rand(4, 3, 16, 16)
    full = engine.run(x)
    one = engine.run(x[1:2])
    assert all(torch.allclose(a[1:2], b) for a, b in zip(_leaves(full.readout), _leaves(one.readout)))
    assert one.steps.tolist() == full.steps[1:2].tolist()
    five = engine.run(torch.cat([x, x[1:2]]))  # slices of 4 and 1 rows
    assert all(torch.equal(a, torch.cat([b, c])) for a, b, c in zip(*map(_leaves, (five.readout, full.readout,
                                                                                  one.readout))))
    assert five.steps.tolist() == full.steps.tolist() + one.steps.tolist()
    with pytest.raises(ValueError, match="does not fit the exported graphs"):
        engine.run(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="wake must be an integer"):
        engine.run(x, wake=0)
    with pytest.raises(ValueError, match="one graph per time step"):
        engine.run(x, mode="multistep")
    with pytest.raises(ValueError, match="stream takes at most the exported batch"):
        next(engine.stream(torch.cat([x, x[1:2]])))


def test_engine_stream_equals_the_pytorch_stream_step_by_step(tmp_path):
    """Every step's readout (the anytime answer), phase, wake count and settled flags, then the run's result;
    no spike counts (the graphs keep none)."""
    for seed in (2, 3):
        snn = convert(random_qann(seed, depth=6))
        folder = tmp_path / str(seed)
        folder.mkdir()
        engine = OrtSpikingNetwork(folder, export_steps(snn, torch.zeros(2, 3, 16, 16), folder, "snn"), threads=1)
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        for schedule in ({"sleep": "auto"}, {"sleep": 4, "burst": 1}):
            expected, got = list(snn.stream(x, **schedule)), list(engine.stream(x, **schedule))
            assert [(e.t, e.phase, e.wake) for e in got] == [(e.t, e.phase, e.wake) for e in expected]
            for e, g in zip(expected, got):
                assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(_leaves(g.readout), _leaves(e.readout)))
                assert torch.equal(g.settled, e.settled)
                assert g.spikes is None and g.energy_pj is None
            assert [e.result is None for e in got] == [e.result is None for e in expected]
            assert torch.equal(got[-1].result.steps, expected[-1].result.steps) and got[-1].result.stats is None
            assert all(torch.equal(a, b) for a, b in zip(_leaves(got[-1].result.readout),
                                                         _leaves(engine.run(x, **schedule).readout)))


def test_engine_cancel_and_states_on_the_providers_device(tmp_path):
    import threading

    snn = convert(random_qann(6, depth=6))
    engine = OrtSpikingNetwork(tmp_path, export_steps(snn, torch.zeros(1, 3, 16, 16), tmp_path, "snn"), threads=1)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RunCancelled):
        engine.run(torch.rand(1, 3, 16, 16), cancel=cancel)
    assert all(v.device_name().lower() == engine.device for buffers in engine._states for v in buffers)


def test_providers_are_selectable_and_missing_ones_refused():
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="provider must be one of"):
        execution_providers("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="no CUDAExecutionProvider"):
            execution_providers("cuda")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="no TensorrtExecutionProvider"):
            execution_providers("tensorrt")


def _same_detections(expected, got) -> None:
    assert (got.steps, got.stage_steps, got.settled, got.wake, got.proposals) == \
        (expected.steps, expected.stage_steps, expected.settled, expected.wake, expected.proposals)
    assert torch.equal(got.boxes.cls, expected.boxes.cls)
    assert torch.allclose(got.boxes.xyxy, expected.boxes.xyxy, atol=1e-3)
    assert torch.allclose(got.boxes.conf, expected.boxes.conf, atol=1e-5)
    assert expected.spikes > 0 and got.spikes is None and got.energy_uj is None  # the graphs count no spikes


@needs_bundled
def test_bundled_yolo_detections_identical_on_both_engines(yolo_export, tmp_path):
    from detector.data.synthetic import generate_bundled

    root = generate_bundled(tmp_path / "data", train=1, val=5, workers=1)
    images = sorted((root / "images" / "val").glob("*.jpg"))
    torch_det = load_detector("yolov8n-bundled")
    ort_det = load_detector("yolov8n-bundled", engine="onnxruntime", export_dir=yolo_export, threads=1)
    assert ort_det.snn.batch == 2
    expected = torch_det.predict(images, sleep="auto", conf=0.1)
    got = ort_det.predict(images, sleep="auto", conf=0.1)  # slices of 2, 2 and 1 (padded) images
    assert sum(len(d) for d in expected) > 0
    for e, g in zip(expected, got, strict=True):
        _same_detections(e, g)
    (qann,) = ort_det.qann_predict(images[:1], conf=0.1)  # the PyTorch QANN, untouched
    assert torch.equal(qann.boxes.cls, torch_det.qann_predict(images[:1], conf=0.1)[0].boxes.cls)
    _same_anytime(torch_det, ort_det, images[:2], [1, 3, 4, 6, 9])
    events = list(ort_det.stream(images[0], conf=0.1))
    expected_events = list(torch_det.stream(images[0], conf=0.1))
    assert [(e.t, e.phase, e.final) for e in events] == [(e.t, e.phase, e.final) for e in expected_events]
    assert all(e.spikes is None and e.detections.energy_uj is None for e in events)
    _same_detections(expected_events[-1].detections, events[-1].detections)


def _same_anytime(torch_det, ort_det, images, timesteps, same_boxes_at=None) -> None:
    """``detections_at_steps`` through either engine: the same steps at every T and the same detections at the T
    of ``same_boxes_at`` (default all). No energy from ONNX Runtime, which counts no spikes."""
    expected, expected_info = torch_det.detections_at_steps(images, timesteps, conf=0.1)
    got, info = ort_det.detections_at_steps(images, timesteps, conf=0.1)
    assert sorted(got) == sorted(expected) == timesteps
    for t in timesteps:
        for e, g in zip(expected[t], got[t], strict=True):
            if t in (same_boxes_at or timesteps):
                _same_detections(e, g)
            else:
                assert (g.steps, g.stage_steps, g.proposals, g.energy_uj) == (e.steps, e.stage_steps, e.proposals,
                                                                              None)
    assert info["steps"] == expected_info["steps"] and info["settled"] == expected_info["settled"]
    assert all(v is None for per_t in info.get("energy_uj_at", {}).values() for v in per_t)


def test_float64_graphs_export_and_the_cpu_provider_refuses_them_clearly(tmp_path):
    snn = convert(random_qann(1, depth=4).double())
    info = export_steps(snn, torch.zeros(1, 3, 8, 8, dtype=torch.float64), tmp_path, "snn")
    onnx.checker.check_model(str(tmp_path / info["graphs"]["sleep"]["file"]), full_check=True)
    with pytest.raises(ValueError, match="snn.first.onnx: ONNX Runtime's CPUExecutionProvider cannot run this float64"):
        OrtSpikingNetwork(tmp_path, info, dtype="float64")


@needs_bundled
def test_graphs_are_exported_once_into_the_cache(onnx_cache, monkeypatch):
    from detector import weights
    from detector.export.detectors import cache_folder

    exports = []
    real = weights.export_detector
    monkeypatch.setattr(weights, "export_detector", lambda *a, **k: exports.append(a) or real(*a, **k))
    first = weights.load_detector("yolov8n-bundled", engine="onnxruntime", threads=1)
    again = weights.load_detector("yolov8n-bundled", engine="onnxruntime", threads=1)
    assert len(exports) <= 1 and type(first.snn) is type(again.snn) is OrtSpikingNetwork
    folder = cache_folder("yolov8n-bundled", "d1", None, 1, "float32")
    assert folder.parent == onnx_cache and folder == cache_folder("yolov8n-bundled", "d1", None, 1, "float32")
    assert len({folder, cache_folder("yolov8n-bundled", "d2", None, 1, "float32"),
                cache_folder("yolov8n-bundled", "d1", None, 8, "float32"),
                cache_folder("yolov8n-bundled", "d1", 320, 1, "float32")}) == 4


@needs_bundled
def test_bundled_faster_rcnn_detections_identical_on_both_engines(rcnn_export, tmp_path):
    from detector.data.synthetic import generate_bundled

    root = generate_bundled(tmp_path / "data", train=1, val=2, workers=1)
    images = sorted((root / "images" / "val").glob("*.jpg"))
    torch_det = load_detector("rcnn-r18-bundled-sfpn")
    ort_det = load_detector("rcnn-r18-bundled-sfpn", engine="onnxruntime", export_dir=rcnn_export, threads=1)
    expected, got = torch_det.predict(images, sleep="auto"), ort_det.predict(images, sleep="auto")
    assert sum(len(e) for e in expected) > 0
    # Where PyTorch's own float32 run flips a quantization boundary (the second image here: even its float32 QANN
    # differs from its float64 QANN), the graphs are compared with the float64 run, which they reproduce.
    exact = load_detector("rcnn-r18-bundled-sfpn", dtype=torch.float64).predict(images, sleep="auto")
    for e, g, e64 in zip(expected, got, exact, strict=True):
        try:
            _same_detections(e, g)
        except AssertionError:
            assert not torch.equal(e.boxes.cls, e64.boxes.cls), "the engines differ where float32 did not flip"
            assert torch.equal(g.boxes.cls, e64.boxes.cls)
            assert torch.allclose(g.boxes.xyxy, e64.boxes.xyxy.float(), atol=1e-2)
    # Before stage 1 settles its readout is a spike count / k, where one float32 boundary flip moves a feature by
    # theta / k and so a proposal and the boxes from it: detections are compared once both stages have settled.
    _same_anytime(torch_det, ort_det, images[:1], [2, 4, 12], same_boxes_at=[12])


def test_load_detector_engines():
    with pytest.raises(ValueError, match="engine must be one of"):
        load_detector("yolov8n-bundled", engine="tvm")
    with pytest.raises(ValueError, match="choose the GPU with provider='cuda'"):
        load_detector("yolov8n-bundled", engine="onnxruntime", device="cuda")

"""ONNX export of the spiking step (detector/export/): graphs pass onnx.checker, one exported step
equals one step of the converted module tree, the CIF update of the runtime's own neurons is what
lands in the graph, and ``casc export`` writes the QANN and step graphs of both bundled detectors."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")

from detector.cli import main as casc  # noqa: E402
from detector.convert import convert  # noqa: E402
from detector.export import SpikingStep, StepExportError, export_steps  # noqa: E402
from detector.export.step import describe, tracing  # noqa: E402
from detector.neurons import CIFNeuron  # noqa: E402
from detector.quant import ClipQuan  # noqa: E402
from detector.randnet import random_qann  # noqa: E402
from detector.weights import load_manifest  # noqa: E402


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


def test_the_graph_runs_the_neurons_own_update(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 2, 1)).eval()
    x = torch.rand(1, 3, 8, 8)
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


@needs_bundled
@pytest.mark.parametrize("model, networks", [("yolov8n-bundled", ["snn"]), ("rcnn-r18-bundled", ["stage1", "stage2"])])
def test_casc_export_writes_checked_graphs(tmp_path, capsys, model, networks):
    assert casc(["export", "--model", model, "--format", "onnx", "--batch", "1", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["family"] == ("yolo" if model.startswith("yolo") else "rcnn") and manifest["batch"] == 1
    assert sorted(manifest["networks"]) == networks
    files = [g["file"] for g in manifest["qann"].values()]
    files += [g["file"] for net in manifest["networks"].values() for g in net["graphs"].values()]
    assert len(files) == len(networks) * 4
    printed = capsys.readouterr().out
    for name in files:
        assert name in printed
        onnx.checker.check_model(str(tmp_path / name), full_check=True)
    assert not list(tmp_path.glob("*.data"))  # every graph is one self-contained file

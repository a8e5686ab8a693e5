"""Writing ONNX graphs: a QANN (one forward) and a spiking network's three step graphs.

Step graphs are traced with PyTorch's TorchScript-based exporter (``dynamo=False``): it runs the
modules' Python code as is, and on the step graphs it is exact where the dynamo exporter (torch 2.14)
returned wrong readouts after an in-place update of a neuron's output. The QANN goes through the
dynamo exporter (the TorchScript tracer cannot read ClipQuan's extra state). Shapes are static: one
export per input size and batch.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.onnx import register_custom_op_symbolic
from torch.utils import _pytree as pytree

from ..runtime import SpikingNetwork
from .step import VARIANTS, SpikingStep, StepExportError, describe, tracing

OPSET = 18


def _register_symbolics() -> None:
    # ``activity |= ...`` (SimulationState.note_activity) traces to aten::__ior_, which the exporter lacks.
    register_custom_op_symbolic("aten::__ior_", lambda g, a, b: g.op("Or", a, b), OPSET)


def _export(module: nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
            what: str, dynamo: bool = False) -> None:
    _register_symbolics()
    options = {"verbose": False, "external_data": False} if dynamo else {"do_constant_folding": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(module, inputs, str(path), input_names=input_names, output_names=output_names,
                              opset_version=OPSET, dynamo=dynamo, **options)
    except StepExportError:
        raise
    except Exception as error:  # the exporter's own errors name the operator, not the module
        where = _modules_using(module, inputs, str(error)) if not dynamo else []
        at = f" (in {', '.join(where)})" if where else ""
        raise StepExportError(f"{what}: cannot be exported to ONNX{at}: {error}") from error
    onnx.checker.check_model(str(path), full_check=True)


def _compact_uniform_constants(path: Path, min_size: int = 1024) -> None:
    """Rewrite large constant tensors that hold one value (traced fresh states: zeros, pre-charged
    membranes) as ``ConstantOfShape``, which stores one number instead of the whole tensor."""
    model = onnx.load(str(path))
    nodes = []
    for node in model.graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and node.attribute[0].name == "value" else None
        if value is not None and np.prod(value.dims) >= min_size:
            array = numpy_helper.to_array(value)
            if (array == array.flat[0]).all():
                shape = onnx.helper.make_node("Constant", [], [node.output[0] + "_shape"],
                                              value=numpy_helper.from_array(np.array(array.shape, np.int64)))
                fill = numpy_helper.from_array(array.reshape(-1)[:1])
                nodes += [shape, onnx.helper.make_node("ConstantOfShape", [shape.output[0]], list(node.output),
                                                       value=fill)]
                continue
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))


def _modules_using(module: nn.Module, inputs: tuple, message: str) -> list[str]:
    """Paths of the modules whose forward applies the operator an export error names (from the trace's scopes)."""
    match = re.search(r"'(aten::\w+?)_?'", message)
    if match is None:
        return []
    op = match.group(1)
    root = module.snn.model if isinstance(module, SpikingStep) else module
    # The tracer records a module's path as its scope only when given this map (as torch.onnx does).
    torch.jit._trace._trace_module_map = {m: name or type(root).__name__ for name, m in root.named_modules()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, _ = torch.jit._get_trace_graph(module, inputs)
    finally:
        torch.jit._trace._trace_module_map = None
    scopes = [node.scopeName() for node in graph.nodes() if node.kind().rstrip("_") == op]
    return sorted({scope.rsplit("/", 1)[-1] for scope in scopes if scope})


@torch.no_grad()
def export_qann(module: nn.Module, example: torch.Tensor, path: str | Path) -> dict:
    """The QANN ``module`` as one graph ``x -> outputs`` (flat); returns its description."""
    path = Path(path)
    outputs, spec = pytree.tree_flatten(module(example))
    names = [f"output_{i}" for i in range(len(outputs))]
    _export(module.eval(), (example,), path, ["x"], names, f"QANN {type(module).__name__}", dynamo=True)
    return {"file": path.name, "inputs": ["x"], "outputs": names, "output_spec": pytree.treespec_dumps(spec)}


def export_steps(snn: SpikingNetwork, example: torch.Tensor, folder: str | Path, prefix: str) -> dict:
    """The first, wake and sleep step graphs of ``snn`` for inputs shaped like ``example``.

    Writes ``{prefix}.first.onnx``, ``{prefix}.wake.onnx``, ``{prefix}.sleep.onnx`` into ``folder`` and
    returns what an engine needs to run them: file names, state names and shapes, readout structure."""
    folder = Path(folder)
    with tracing(snn), torch.no_grad():
        layout = describe(snn, example)
        for i, shape in enumerate(layout.readout_shapes):
            if not shape or shape[0] != example.shape[0]:
                raise StepExportError(f"{prefix}: readout {i} has shape {shape}, its first axis is not the batch "
                                      f"({example.shape[0]}); the engine keeps one readout row per sample")
        graphs = {}
        for variant in VARIANTS:
            step = SpikingStep(snn, variant, layout)
            path = folder / f"{prefix}.{variant}.onnx"
            _export(step, step.example_inputs(example), path, step.input_names(), step.output_names(),
                    f"{prefix} {variant} step")
            if variant == "first":
                _compact_uniform_constants(path)
                onnx.checker.check_model(str(path), full_check=True)
            graphs[variant] = {"file": path.name, "inputs": step.input_names(), "outputs": step.output_names()}
    return {
        "graphs": graphs,
        "input_shape": list(example.shape),
        "levels": snn.levels,
        "state_names": layout.state_names,
        "state_shapes": [list(s) for s in layout.state_shapes],
        "readout_shapes": [list(s) for s in layout.readout_shapes],
        "readout_spec": pytree.treespec_dumps(layout.readout_spec),
    }

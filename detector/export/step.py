"""One time step of a converted network as a pure function of tensors, for tracing to ONNX.

The step is the converted module tree itself, run for one stack: ``SpikingStep`` loads the states
from its inputs into the call-site modules, runs the tree once (the runtime's own neurons, LIPools,
islands and gated synapses, whatever their update does), and returns the new states, the readout
increment and which samples saw any spike. Three variants make the schedule:

    first  (x)                              -> states, totals, readout, active   k = 1, fresh states
    wake   (x, k, *states, *totals)         -> states, totals, readout, active   k = 2..W, biases on
    sleep  (x, k, burst, *states, *totals)  -> states, totals, readout, active   biases off

``states`` are every neuron / LIPool / island state, ``totals`` the readouts summed so far (the
readout state, so that an engine never copies a readout off the device between steps), ``readout``
this step's increment. The first step creates the states inside the graph (each module's own initial
state, e.g. a pre-charged membrane), so the host never has to know how a state starts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..runtime import SpikingNetwork
from ..state import CallSiteModule
from ..synapses import Synapse

VARIANTS = ("first", "wake", "sleep")


class StepExportError(RuntimeError):
    """A network (or one of its modules) whose step cannot be written as a graph."""


def state_modules(snn: SpikingNetwork) -> list[CallSiteModule]:
    """The modules whose call-site states are tensors that carry over between steps.

    A synapse's per-site state is only a flag learnt by the flow trace (for counting work), so it is
    not part of the step's state."""
    return [m for m in snn.stateful if not isinstance(m, Synapse)]


@dataclass
class StepLayout:
    """How the flat state and readout tensors of a step map onto the network (from one eager step)."""

    state_spec: pytree.TreeSpec  # [module._states for module in state_modules(snn)]
    readout_spec: pytree.TreeSpec  # the model's output structure
    state_names: list[str]  # one per flat state tensor: call site and position in its state
    state_shapes: list[tuple[int, ...]]
    readout_shapes: list[tuple[int, ...]]


@contextmanager
def tracing(snn: SpikingNetwork):
    """Steps without recording or event-driven skipping; the simulator as it was afterwards."""
    sim = snn.sim
    saved = sim.record, sim.recorder, sim.event_driven, sim.burst
    try:
        yield
    finally:
        sim.record, sim.recorder, sim.event_driven, sim.burst = saved
        snn.reset()


def _begin_stack(snn: SpikingNetwork, sleeping: bool, k, batch: int, device) -> None:
    sim = snn.sim
    sim.record, sim.recorder, sim.event_driven = False, None, False
    sim.begin_stack(sleeping, [k], batch, device)
    for m in snn.stateful:
        m.begin_stack()


def _flat_states(snn: SpikingNetwork) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    leaves, spec = pytree.tree_flatten([m._states for m in state_modules(snn)])
    return leaves, spec


def describe(snn: SpikingNetwork, x: torch.Tensor) -> StepLayout:
    """Run the first step eagerly on ``x`` and read the layout of its states and readout.

    One runtime step comes first: its flow trace refuses networks the simulator itself refuses
    (hidden non-linear functions, samples mixed on the batch axis), with the runtime's own errors."""
    snn.run(x, wake=1, sleep=0, record=False)
    snn.reset()
    with torch.no_grad():
        _begin_stack(snn, False, torch.ones((), dtype=x.dtype, device=x.device), x.shape[0], x.device)
        readout = snn.model(x)
    names, leaves = [], []
    for m in state_modules(snn):
        for site, state in enumerate(m._states):
            site_leaves, _ = pytree.tree_flatten(state)
            for j, leaf in enumerate(site_leaves):
                if not isinstance(leaf, torch.Tensor) or leaf.dtype != x.dtype:
                    what = f"a {leaf.dtype} tensor" if isinstance(leaf, torch.Tensor) else f"a {type(leaf).__name__}"
                    raise StepExportError(f"{m.site(site)} ({type(m).__name__}): its state holds {what}; only "
                                          f"{x.dtype} tensors (the network's dtype) can be graph inputs")
                names.append(f"{m.site(site)}[{j}]")
                leaves.append(leaf)
    _, state_spec = _flat_states(snn)
    readout_leaves, readout_spec = pytree.tree_flatten(readout)
    if not all(isinstance(t, torch.Tensor) for t in readout_leaves):
        raise StepExportError("the network's output holds values that are not tensors; only tensors can be "
                              "graph outputs")
    snn.reset()
    return StepLayout(state_spec, readout_spec, names, [tuple(t.shape) for t in leaves],
                      [tuple(t.shape) for t in readout_leaves])


class SpikingStep(nn.Module):
    """One step of ``snn`` (variant ``first``, ``wake`` or ``sleep``) as a function of flat tensors.

    Outputs: the new states (flat, in ``layout.state_names`` order), the new readout totals and the
    readout increment (flat, in ``layout.readout_spec`` order), and ``active`` [batch] bool: did any
    neuron or island emit in this step (none in a sleep step: the fixed point)."""

    def __init__(self, snn: SpikingNetwork, variant: str, layout: StepLayout):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.snn, self.variant, self.layout = snn, variant, layout

    def forward(self, x: torch.Tensor, *args: torch.Tensor):
        snn, variant = self.snn, self.variant
        snn.reset()
        n_states = len(self.layout.state_names)
        if variant == "first":
            k, states, totals = torch.ones((), dtype=x.dtype, device=x.device), [], None
        else:
            if variant == "sleep":
                snn.sim.burst, args = args[1], (args[0], *args[2:])
            k, states, totals = args[0], args[1:1 + n_states], args[1 + n_states:]
        # States arrive as graph inputs; the modules update them in place, so each gets its own copy.
        loaded = pytree.tree_unflatten([s.clone() for s in states], self.layout.state_spec) if states else None
        _begin_stack(snn, variant == "sleep", k, x.shape[0], x.device)
        if loaded is not None:
            for m, sites in zip(state_modules(snn), loaded):
                m._states = sites
        readout = snn.model(x)
        new_states, _ = _flat_states(snn)
        if len(new_states) != n_states:
            raise StepExportError(f"the {variant} step made {len(new_states)} state tensors where the first step "
                                  f"made {n_states}: the forward pass differs between steps")
        increments = pytree.tree_leaves(readout)
        new_totals = [i.clone() for i in increments] if totals is None else [t + i for t, i in zip(totals, increments)]
        active = snn.sim.activity.view(-1)
        return (*new_states, *new_totals, *increments, active)

    def example_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inputs of the right shapes and dtypes to trace this variant with."""
        if self.variant == "first":
            return (x,)
        k = torch.full((), 2.0, dtype=x.dtype, device=x.device)
        states = [torch.zeros(shape, dtype=x.dtype, device=x.device)
                  for shape in (*self.layout.state_shapes, *self.layout.readout_shapes)]
        if self.variant == "wake":
            return (x, k, *states)
        return (torch.zeros_like(x), k, torch.full((), 4.0, dtype=x.dtype, device=x.device), *states)

    def input_names(self) -> list[str]:
        states = [f"state_{i}" for i in range(len(self.layout.state_names))]
        states += [f"total_{i}" for i in range(len(self.layout.readout_shapes))]
        return {"first": ["x"], "wake": ["x", "k", *states], "sleep": ["x", "k", "burst", *states]}[self.variant]

    def output_names(self) -> list[str]:
        states = [f"new_state_{i}" for i in range(len(self.layout.state_names))]
        totals = [f"new_total_{i}" for i in range(len(self.layout.readout_shapes))]
        readouts = [f"readout_{i}" for i in range(len(self.layout.readout_shapes))]
        return [*states, *totals, *readouts, "active"]

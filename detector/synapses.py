"""Synaptic layers of the spiking network: conv / linear / channel-affine with a gated bias.

Wake steps run the layer with its bias; sleep steps run it without (a flag of the simulation,
the weights are never swapped). In sleep, rows whose input carries no spike are skipped
(event-driven): their output is exactly zero. Each layer also counts its work: MACs where its
input is analog (the image, another synapse's output), synaptic operations (input events x real fan-out) otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .energy import count_sum, layer_macs, row_totals
from .spike_counts import counter_for
from .state import CallSiteModule, Events


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (axis 1): a BatchNorm that had no layer to fold into."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(scale.detach().clone())
        self.bias = nn.Parameter(shift.detach().clone())

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        y = x * self._view(self.weight, x)
        return y + self._view(self.bias, x) if bias else y


SYNAPTIC_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, ChannelAffine)


class Synapse(CallSiteModule):
    """Wraps one conv / linear / affine layer (weights shared with the QANN it came from).

    ``input_kinds[n]`` says whether its n-th call per step receives spikes (synaptic operations) or
    an analog current (MACs); the flow trace (``flow.SpikeFlowTrace``) learns it once per input
    signature and it is kept across runs.
    """

    kind = "synapse"

    def __init__(self, layer: nn.Module):
        super().__init__()
        if not isinstance(layer, SYNAPTIC_LAYERS):
            raise TypeError(f"Synapse wraps {', '.join(t.__name__ for t in SYNAPTIC_LAYERS)}, got {type(layer).__name__}")
        self.layer = layer
        self._out_shapes: dict[torch.Size, torch.Size] = {}
        self._plans: dict[tuple, tuple] = {}  # per input shape, see _counting_plan
        self._macs_per_row: dict[torch.Size, int] = {}
        self.input_kinds: list[bool] = []

    def note_input_kind(self, spikes: bool) -> None:
        """Called by the flow trace right before this layer runs (its next call)."""
        index = self._calls
        if index < len(self.input_kinds):
            self.input_kinds[index] = spikes
        else:
            self.input_kinds.append(spikes)

    def apply_layer(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, layer.weight, layer.bias if bias else None)
        if isinstance(layer, _ConvNd):
            return layer._conv_forward(x, layer.weight, layer.bias if bias else None)
        return layer(x, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sim = self.sim
        index, _ = self.next_state(lambda: None)
        spike_input = index < len(self.input_kinds) and self.input_kinds[index]  # untraced: count dense MACs
        active, n_active = None, x.shape[0]  # every row computed
        published = sim.published(x) if sim.record or (sim.sleeping and sim.event_driven) else None
        if not sim.sleeping:
            y = self.apply_layer(x, bias=True)
            self._out_shapes[x.shape[1:]] = y.shape[1:]
        elif not sim.event_driven:
            y = self.apply_layer(x, bias=False)
        else:
            # a row's events, from the neuron that made x or from x itself (abs().sum() is faster than any() on CPU)
            active = (published.per_row if published is not None else x.flatten(1).abs().sum(1)) > 0
            n_active = int(active.sum())
            if n_active == x.shape[0]:
                y = self.apply_layer(x, bias=False)
            else:
                y = x.new_zeros((x.shape[0], *self._out_shapes[x.shape[1:]]))
                if n_active:
                    index = active.nonzero().squeeze(1)
                    y.index_copy_(0, index, self.apply_layer(x.index_select(0, index), bias=False))
        if sim.record:
            self._record(x, y, active, n_active, spike_input, published)
        return y

    # --- work counting -------------------------------------------------------------------

    def _counting_plan(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """How this layer's synaptic operations are counted for inputs shaped as ``x``, worked out once per shape:
        ``(targets_at, targets)``. ``targets_at``: in float64, flattened, how many targets an event at each input
        position reaches (fan-out x output channels per group); None where that is the same everywhere,
        ``targets``."""
        key = (x.shape[1:], x.device)
        plan = self._plans.get(key)
        if plan is None:
            layer = self.layer
            if isinstance(layer, _ConvNd):
                targets_at = self._fanout(x.shape[2:]).flatten().to(x.device) * (layer.out_channels // layer.groups)
                plan = (None, float(targets_at[0])) if bool((targets_at == targets_at[0]).all()) else (targets_at, 0.0)
            else:
                plan = (None, float(layer.out_features if isinstance(layer, nn.Linear) else 1))
            self._plans[key] = plan
        return plan

    def _fanout(self, spatial: torch.Size) -> torch.Tensor:
        """Per input position: how many (output position, kernel tap) pairs read it (float64)."""
        layer = self.layer
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(layer.kernel_size) - 1]
        with torch.enable_grad():
            probe = torch.ones((1, 1, *spatial), dtype=torch.float64, requires_grad=True)
            taps = torch.ones((1, 1, *layer.kernel_size), dtype=torch.float64)
            conv(probe, taps, None, layer.stride, layer.padding, layer.dilation).sum().backward()
        return probe.grad[0, 0]

    @staticmethod
    def _event_map(x: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        """1 where ``x`` carries an event, else 0, in ``scratch`` (a buffer shaped as ``x``, ``StatsRecorder.scratch``:
        one pass over ``x`` with no allocation) or a new tensor."""
        return torch.ne(x, 0, out=torch.empty_like(x) if scratch is None else scratch)

    @classmethod
    def events_per_position(cls, x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Input events of each row at each position, summed over channels (axis 1): ``[rows, positions]``."""
        return count_sum(cls._event_map(x, scratch), 1).view(x.shape[0], -1)

    @classmethod
    def events_per_row(cls, x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Input events of each row, ``[rows]`` (``energy.row_totals``, float32 where exact: each element counts one at
        most)."""
        return row_totals(cls._event_map(x, scratch).reshape(x.shape[0], -1), x.shape[1:].numel())

    def _sop_terms(self, x: torch.Tensor, published: Events | None, recorder) -> tuple[torch.Tensor, float]:
        """``(values, scale)``, values ``[rows]`` (exact integers, float32 or float64): the synaptic operations per
        row are ``values * scale``, events per row and the uniform fan-out where the fan-out is uniform (the product
        waits for the stack's other layers, ``StatsRecorder.end_stack``), else the operations themselves and 1."""
        targets_at, targets = self._counting_plan(x)
        if targets_at is None:
            return (published.per_row if published is not None else self._input_events(x, recorder, False)), targets
        events = published.per_position if published is not None else self._input_events(x, recorder, True)
        fused = counter_for(recorder.fused_counter, events)
        if fused is not None:
            return fused.weighted_totals(events, targets_at), 1.0  # one call, the same float64 figures
        return events.double() @ targets_at, 1.0

    def _input_events(self, x: torch.Tensor, recorder, per_position: bool) -> torch.Tensor:
        """Events of an input that no neuron published (a concatenation, a pool...): at each position or per row.
        In one pass by the fused counter where it serves, else with eager PyTorch; the counts are the same."""
        fused = counter_for(recorder.fused_counter, x, x.shape[1:].numel())
        if fused is not None:
            at_position, per_row = fused.count_events(x)
            return at_position if per_position else per_row
        scratch = recorder.scratch(x)
        return self.events_per_position(x, scratch) if per_position else self.events_per_row(x, scratch)

    def _record(self, x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, n_active: int,
                spike_input: bool, published: Events | None) -> None:
        recorder = self.sim.recorder
        per_row_macs = self._macs_per_row.get(x.shape[1:])
        if per_row_macs is None:
            per_row_macs = self._macs_per_row[x.shape[1:]] = layer_macs(self.layer, y) // max(y.shape[0], 1)
        skipped = x.shape[0] - n_active
        if not spike_input:
            recorder.record_synapse(self.site_name, per_row_macs, computed_rows=active if skipped else None,
                                    skipped_rows=skipped)
            return
        # Nothing to count where no row of the input carries an event: a sleep step skipped every row, or the neuron
        # that made the input published it as silent (no per-position events).
        if n_active == 0 or (published is not None and published.per_position is None):
            values, scale = recorder.zero_rows(x.shape[0]), 1.0
        else:
            values, scale = self._sop_terms(x, published, recorder)
        recorder.record_synapse(self.site_name, per_row_macs, sops=values, sops_scale=scale, skipped_rows=skipped)

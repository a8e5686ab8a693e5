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

from .energy import layer_macs
from .state import CallSiteModule


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
        self._fanouts: dict[tuple, torch.Tensor] = {}
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
        if not sim.sleeping:
            y = self.apply_layer(x, bias=True)
            self._out_shapes[x.shape[1:]] = y.shape[1:]
            active = None
        elif not sim.event_driven:
            y, active = self.apply_layer(x, bias=False), None
        else:
            active = x.flatten(1).abs().sum(1) > 0  # faster than any() on CPU
            n_active = int(active.sum())
            if n_active == x.shape[0]:
                y = self.apply_layer(x, bias=False)
            else:
                y = x.new_zeros((x.shape[0], *self._out_shapes[x.shape[1:]]))
                if n_active:
                    index = active.nonzero().squeeze(1)
                    y.index_copy_(0, index, self.apply_layer(x.index_select(0, index), bias=False))
        if sim.record:
            self._record(x, y, active, spike_input)
        return y

    # --- work counting -------------------------------------------------------------------

    def _fanout(self, spatial: torch.Size, device, dtype) -> torch.Tensor:
        """Per input position: how many (output position, kernel tap) pairs read it."""
        key = (tuple(spatial), device, dtype)
        if key not in self._fanouts:
            layer = self.layer
            dims = len(layer.kernel_size)
            conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
            with torch.enable_grad():
                probe = torch.ones((1, 1, *spatial), dtype=torch.float64, requires_grad=True)
                taps = torch.ones((1, 1, *layer.kernel_size), dtype=torch.float64)
                conv(probe, taps, None, layer.stride, layer.padding, layer.dilation).sum().backward()
            self._fanouts[key] = probe.grad[0, 0].to(device=device, dtype=dtype)
        return self._fanouts[key]

    def synaptic_ops(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Events arriving in each row times the number of targets each one reaches, in float64.

        ``scratch``: a buffer shaped as ``x`` for the event map (``StatsRecorder.scratch``); writing the
        comparison straight into it is one pass over ``x``, where sign().abs_() was two and an allocation."""
        layer = self.layer
        events = torch.ne(x, 0, out=torch.empty_like(x) if scratch is None else scratch)
        if isinstance(layer, _ConvNd):
            fanout = self._fanout(x.shape[2:], x.device, x.dtype)
            per_channel = events.flatten(2) @ fanout.flatten()  # [rows, channels]: events x their targets
            return per_channel.sum(1, dtype=torch.float64) * (layer.out_channels // layer.groups)
        events = events.flatten(1).sum(1, dtype=torch.float64)
        return events * layer.out_features if isinstance(layer, nn.Linear) else events

    def _record(self, x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, spike_input: bool) -> None:
        sim = self.sim
        steps = sim.steps
        per_row_macs = layer_macs(self.layer, y) // max(y.shape[0], 1)
        skipped = 0 if active is None else x.shape[0] - active.sum()
        if not spike_input:
            computed = torch.full((x.shape[0],), float(per_row_macs), device=x.device, dtype=torch.float64)
            ops, analog = None, (computed if active is None else computed * active).view(steps, -1)
        else:
            ops, analog = self.synaptic_ops(x, sim.recorder.scratch(x)).view(steps, -1), None
        sim.recorder.record_synapse(self.site_name, per_row_macs, ops, analog, skipped_rows=skipped)

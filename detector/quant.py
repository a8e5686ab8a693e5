"""ANN -> quantized ANN (QANN): clip-floor activations with a straight-through gradient.

``ClipQuan_L(z) = theta * clamp(floor(L * z / theta + phi), 0, L) / L`` (``docs/method.md``), with
``phi = 1/2`` (rounding, the default) or ``phi = 0`` (floor, the paper's form). Floor biases every
activation down by theta/2L on average, which compounds over a deep detector; rounding removes the
bias and stays exact in the spiking network (the neuron's membrane starts pre-charged to phi * theta).
A spiking network converted from a QANN reproduces it exactly, so everything the SNN can do is decided here.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

# Activations that `to_qann` replaces by ClipQuan: all are ReLU-like (zero or small for
# negative input, increasing), which a clipped staircase approximates after fine-tuning.
QUANTIZABLE_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.ReLU6)
ROUNDING = {"round": 0.5, "floor": 0.0}  # the shift inside the floor
# Added to that shift, in both the QANN and the CIF neurons' initial membrane (``ClipQuan.phi``): an input that lies
# exactly on a level boundary (common with fp16 weights and thresholds, whose sums land on a lattice) then rounds
# up in both networks, whichever order their float sums were taken in. 2^-16 of a level is above float32's and
# float64's summation error there and far below anything that changes an answer.
TIE_MARGIN = 2.0 ** -16
ROUNDING_MODES = ("floor", "round")  # the integer codes of the ``quant_rounding`` buffer


class ClipQuan(nn.Module):
    """Clip-round (or clip-floor) activation with ``levels`` steps between 0 and ``threshold``.

    The gradient passes straight through inside the clip range and is zero outside it. With
    ``learnable=True`` the threshold is a parameter trained as in LSQ/QCFS (its gradient is the
    quantization residual inside the range and 1 above it); conversion folds it into the neuron
    threshold. ``levels`` and ``rounding`` are also integer buffers, so a state dict restores
    per-layer level counts and the rounding mode (and tools that average floating state, like an
    EMA, leave them alone).
    """

    def __init__(self, levels: int, threshold: float = 1.0, learnable: bool = False, rounding: str = "round"):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"ClipQuan threshold must be > 0, got {threshold!r}")
        self.register_buffer("quant_levels", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("quant_rounding", torch.tensor(0, dtype=torch.int64))  # index into ROUNDING_MODES
        self.levels = levels
        self.rounding = rounding
        value = torch.tensor(float(threshold))
        if learnable:
            self.threshold_param = nn.Parameter(value)
        else:
            self.register_buffer("threshold_param", value)

    # Python copies of the integer buffers: read every forward, so kept off the tensor path.
    @property
    def levels(self) -> int:
        return self._levels

    @levels.setter
    def levels(self, value: int) -> None:
        self._levels = _check_levels(value)
        self.quant_levels.fill_(self._levels)

    @property
    def rounding(self) -> str:
        return self._rounding

    @rounding.setter
    def rounding(self, value: str) -> None:
        self._rounding = _check_rounding(value)
        self.quant_rounding.fill_(ROUNDING_MODES.index(self._rounding))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.levels = int(self.quant_levels)
        self.rounding = ROUNDING_MODES[int(self.quant_rounding)]

    @property
    def threshold(self) -> float:
        return float(self.threshold_param.detach())

    @property
    def learnable(self) -> bool:
        return isinstance(self.threshold_param, nn.Parameter)

    @property
    def phi(self) -> float:
        """The shift inside the floor, in levels: 1/2 rounds, 0 floors (each plus ``TIE_MARGIN``)."""
        return ROUNDING[self.rounding] + TIE_MARGIN

    def set_learnable(self, learnable: bool) -> None:
        """Make the threshold a trainable parameter (or a fixed buffer), keeping its value."""
        if learnable == self.learnable:
            return
        value = self.threshold_param.detach().clone()
        del self.threshold_param
        if learnable:
            self.threshold_param = nn.Parameter(value)
        else:
            self.register_buffer("threshold_param", value)

    lower = 0.0  # the clip range is [lower * theta, theta]: 0 (one-sided, ReLU-like), -1 for SignedClipQuan

    @property
    def signed(self) -> bool:
        return self.lower < 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        theta = self.threshold_param.to(z.dtype)
        clipped = torch.clamp(z / theta, self.lower, 1.0)
        stepped = torch.floor(clipped * self._levels + (ROUNDING[self._rounding] + TIE_MARGIN)) / self._levels
        # Straight-through: forward value is the staircase, gradient that of the clip.
        return theta * (clipped + (stepped - clipped).detach())

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, threshold={self.threshold:g}, rounding={self.rounding}, "
                f"learnable={self.learnable}")


class SignedClipQuan(ClipQuan):
    """``ClipQuan`` over ``[-theta, theta]``: ``2 * levels + 1`` values, for signals that have no ReLU to quantize.

    It quantizes a signed analog signal where the network has none, so that the next layer receives spikes
    (Faster R-CNN's FPN outputs before the RPN head and the box head). Its CIF neuron takes negative
    spikes below zero as well (``CIFNeuron(signed=True)``: a count in ``[-cap, cap]``). Not a ReLU, so the
    IF baseline cannot reproduce it.
    """

    lower = -1.0


def _check_levels(levels) -> int:
    if isinstance(levels, bool) or int(levels) != levels or levels < 1:
        raise ValueError(f"ClipQuan levels must be a positive integer, got {levels!r}")
    return int(levels)


def _check_rounding(rounding: str) -> str:
    if rounding not in ROUNDING:
        raise ValueError(f"ClipQuan rounding must be one of {sorted(ROUNDING)}, got {rounding!r}")
    return rounding


def activation_references(model: nn.Module, types: tuple[type[nn.Module], ...]):
    """Every (parent, attribute name, path) through which ``model`` holds a module of ``types``.

    A module object reachable through several attributes (Ultralytics' shared ``Conv.default_act``)
    is listed once per attribute, so each reference can get its own replacement.
    """
    refs = []
    for parent_path, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent.named_children():
            if isinstance(child, types):
                path = f"{parent_path}.{name}" if parent_path else name
                refs.append((parent, name, path))
    return refs


def unshare_modules(model: nn.Module, types: tuple[type[nn.Module], ...]) -> int:
    """Give every attribute that holds a module of ``types`` its own copy; returns how many copies."""
    seen: set[int] = set()
    copies = 0
    for parent, name, _ in activation_references(model, types):
        child = getattr(parent, name)
        if id(child) in seen:
            setattr(parent, name, copy.deepcopy(child))
            copies += 1
        seen.add(id(child))
    return copies


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batches: Iterable[torch.Tensor], percentile: float = 99.9,
                         types: tuple[type[nn.Module], ...] = (nn.ReLU, ClipQuan)) -> dict[str, float]:
    """Per activation call site, the ``percentile`` of its outputs on ``batches`` (mean over batches).

    Keys are ``path`` for a module's first call in a forward pass and ``path#n`` for its n-th,
    the names the converted network uses. Run it on a model whose shared activations were
    unshared (``convert`` does this) so that paths identify call sites.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    model.eval()
    values: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    hooks = []

    def hook_for(path):
        def hook(module, inputs, output):
            calls[path] += 1
            site = path if calls[path] == 1 else f"{path}#{calls[path]}"
            flat = output.detach().flatten().double()
            k = max(1, math.ceil(percentile / 100 * flat.numel()))
            values[site].append(float(flat.kthvalue(k).values))
        return hook

    for path, module in model.named_modules():
        if isinstance(module, types):
            hooks.append(module.register_forward_hook(hook_for(path)))
    n = 0
    try:
        for batch in batches:
            calls.clear()
            model(batch)
            n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("calibrate_thresholds: no calibration batches given")
    # A site that never fires (percentile 0) still needs a positive threshold.
    return {site: max(sum(v) / len(v), 1e-6) for site, v in values.items()}


def to_qann(
    model: nn.Module,
    levels: int,
    threshold: float = 1.0,
    learnable: bool = False,
    inplace: bool = False,
    types: tuple[type[nn.Module], ...] = QUANTIZABLE_ACTIVATIONS,
    calibration: Iterable[torch.Tensor] | None = None,
    percentile: float = 99.9,
    rounding: str = "round",
    site_levels: dict[str, int] | None = None,
) -> nn.Module:
    """Replace every ReLU/SiLU/LeakyReLU/ReLU6 module of ``model`` by a fresh ``ClipQuan``.

    Returns a deep copy unless ``inplace=True``. Each attribute reference gets its own ClipQuan,
    also when the original module object was shared; a module called several times from one
    parent stays one module here and gets one neuron state per call at conversion.
    ``rounding``: ``"round"`` (default) or ``"floor"``. ``site_levels``: level counts for some
    activation paths (e.g. ``{"model.0.act": 8}``: the first layer is the most sensitive); the
    spiking network then runs ``max(levels)`` wake steps. ``calibration``: input batches; each
    ClipQuan's threshold then starts at the ``percentile`` of its float activation (the largest
    over its call sites) instead of ``threshold`` (``detector.calibrate`` has the better,
    MSE-optimal choice). Raises ``ValueError`` if the model has no activation to replace.
    """
    target = model if inplace else copy.deepcopy(model)
    sites: dict[str, float] = {}
    if calibration is not None:
        unshare_modules(target, types)
        was_training = target.training
        sites = calibrate_thresholds(target, calibration, percentile, types)
        target.train(was_training)
    refs = activation_references(target, types)
    if not refs:
        kinds = ", ".join(t.__name__ for t in types)
        raise ValueError(f"to_qann: the model has no activation module to quantize (looked for {kinds})")
    site_levels = dict(site_levels or {})
    unknown = sorted(set(site_levels) - {path for _, _, path in refs})
    if unknown:
        raise ValueError(f"to_qann: site_levels names paths that are not activations: {', '.join(unknown)}")
    for parent, name, path in refs:
        calibrated = [v for site, v in sites.items() if site == path or site.startswith(f"{path}#")]
        theta = max(calibrated) if calibrated else threshold
        setattr(parent, name, ClipQuan(site_levels.get(path, levels), threshold=theta, learnable=learnable,
                                       rounding=rounding))
    return target


def qann_levels(model: nn.Module) -> int | None:
    """The wake count a QANN needs: the largest ``levels`` of its ClipQuan modules (None if it has none)."""
    levels = [m.levels for m in model.modules() if isinstance(m, ClipQuan)]
    return max(levels) if levels else None


def quantizers(model: nn.Module) -> list[tuple[str, ClipQuan]]:
    """(path, module) of every ClipQuan of ``model``, in registration order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ClipQuan)]


def with_legacy_quant_state(model: nn.Module, state: dict) -> dict:
    """``state`` plus the ClipQuan level / rounding buffers that state dicts written before rounding lack.

    Those QANNs were all clip-floor with one level count (the ClipQuan modules ``model`` was built
    with), so their quantizers load as ``rounding="floor"``: the network they were trained as."""
    state = dict(state)
    for path, module in quantizers(model):
        prefix = f"{path}." if path else ""
        state.setdefault(f"{prefix}quant_levels", torch.tensor(module.levels, dtype=torch.int64))
        state.setdefault(f"{prefix}quant_rounding", torch.tensor(ROUNDING_MODES.index("floor"), dtype=torch.int64))
    return state

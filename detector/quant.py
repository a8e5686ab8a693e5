"""ANN -> quantized ANN (QANN): clip-floor activations with a straight-through gradient.

``ClipQuan_L(z) = theta * floor(L * clamp(z / theta, 0, 1)) / L`` (DESIGN §1). A spiking network
converted from a QANN reproduces it exactly, so everything the SNN can do is decided here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Activations that `to_qann` replaces by ClipQuan: all are ReLU-like (zero or small for
# negative input, increasing), which a clipped staircase approximates after fine-tuning.
QUANTIZABLE_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.ReLU6)


class ClipQuan(nn.Module):
    """Clip-floor activation with ``levels`` steps between 0 and ``threshold``.

    The gradient passes straight through inside the clip range and is zero outside it. With
    ``learnable=True`` the threshold is a parameter trained as in QCFS/PACT (its gradient is the
    clipped part); conversion folds it into the neuron threshold.
    """

    def __init__(self, levels: int, threshold: float = 1.0, learnable: bool = False):
        super().__init__()
        if int(levels) != levels or levels < 1:
            raise ValueError(f"ClipQuan levels must be a positive integer, got {levels!r}")
        if not threshold > 0:
            raise ValueError(f"ClipQuan threshold must be > 0, got {threshold!r}")
        self.levels = int(levels)
        value = torch.tensor(float(threshold))
        if learnable:
            self.threshold_param = nn.Parameter(value)
        else:
            self.register_buffer("threshold_param", value)

    @property
    def threshold(self) -> float:
        return float(self.threshold_param.detach())

    @property
    def learnable(self) -> bool:
        return isinstance(self.threshold_param, nn.Parameter)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        theta = self.threshold_param.to(z.dtype)
        clipped = torch.clamp(z / theta, 0.0, 1.0)
        stepped = torch.floor(clipped * self.levels) / self.levels
        # Straight-through: forward value is the staircase, gradient that of the clip.
        return theta * (clipped + (stepped - clipped).detach())

    def extra_repr(self) -> str:
        return f"levels={self.levels}, threshold={self.threshold:g}, learnable={self.learnable}"


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


def to_qann(
    model: nn.Module,
    levels: int,
    threshold: float = 1.0,
    learnable: bool = False,
    inplace: bool = False,
    types: tuple[type[nn.Module], ...] = QUANTIZABLE_ACTIVATIONS,
) -> nn.Module:
    """Replace every ReLU/SiLU/LeakyReLU/ReLU6 module of ``model`` by a fresh ``ClipQuan``.

    Returns a deep copy unless ``inplace=True``. Each attribute reference gets its own ClipQuan,
    also when the original module object was shared; a module called several times from one
    parent stays one module here and gets one neuron state per call at conversion.
    Raises ``ValueError`` if the model has no activation to replace.
    """
    target = model if inplace else copy.deepcopy(model)
    refs = activation_references(target, types)
    if not refs:
        kinds = ", ".join(t.__name__ for t in types)
        raise ValueError(f"to_qann: the model has no activation module to quantize (looked for {kinds})")
    for parent, name, _ in refs:
        setattr(parent, name, ClipQuan(levels, threshold=threshold, learnable=learnable))
    return target


def qann_levels(model: nn.Module) -> int | None:
    """The common ``levels`` of the model's ClipQuan modules, or None if there are none or they differ."""
    levels = {m.levels for m in model.modules() if isinstance(m, ClipQuan)}
    return levels.pop() if len(levels) == 1 else None

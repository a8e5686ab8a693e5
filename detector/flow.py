"""Which tensors carry spikes: a trace of the first stack of every run.

Module-level validation cannot see what a module's own ``forward`` computes. This trace watches
every torch function applied to data (tensors derived from the network input) and tells:

- for every synapse call site, whether its input is spike events (neuron outputs, possibly added,
  concatenated, upsampled or max-pooled) or an analog current (the image, another synapse's
  output, an analog island's output): synaptic operations or dense MACs;
- every non-linear function applied to data outside a neuron or analog island (a sigmoid, a
  softmax, a product of two data tensors, a functional max-pool): these would silently break
  the conversion, so the run stops with an error naming the module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .errors import UnsupportedModuleError
from .islands import AnalogIsland
from .neurons import Neuron
from .pooling import LIPool
from .synapses import Synapse

SPIKES, ANALOG = "spikes", "analog"

# Non-linear in their data input whatever the other arguments are.
_NONLINEAR = {
    "sigmoid", "tanh", "softmax", "log_softmax", "softmin", "relu", "relu_", "relu6", "silu", "gelu", "hardswish",
    "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "exp", "exp2", "log", "log2",
    "sqrt", "rsqrt", "abs", "sign", "floor", "ceil", "round", "trunc", "frac", "clamp", "clip", "clamp_min",
    "clamp_max", "minimum", "maximum", "max", "min", "amax", "amin", "topk", "sort", "argmax", "argmin",
    "layer_norm", "group_norm", "instance_norm", "normalize", "reciprocal", "erf", "sin", "cos", "tan",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "where", "masked_fill", "nonzero",
}
_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
          "max_pool3d_with_indices"}
# Non-linear when two or more of their inputs are data (a product of two signals).
_PRODUCTS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "matmul", "__matmul__", "__rmatmul__", "bmm", "mm",
             "einsum", "prod", "outer", "baddbmm", "addmm", "addcmul", "bilinear"}
_DIVISIONS = {"div", "div_", "__truediv__", "__itruediv__", "true_divide", "floor_divide", "__floordiv__"}
_POWERS = {"pow", "__pow__", "pow_", "square", "float_power"}


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _kernel_is_one(args, kwargs) -> bool:
    kernel = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
    return kernel == 1 or kernel == (1, 1) or kernel == [1, 1]


class SpikeFlowTrace(TorchFunctionMode):
    """Context manager: trace one forward pass of a converted network's module tree."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.kind = WeakIdKeyDictionary()
        self.problems: list[tuple[str, str, str]] = []
        self._stack: list[str] = []
        self._inside = 0  # depth inside spiking modules, which label their own outputs
        self._hooks = []

    # --- labels -------------------------------------------------------------------------------

    def mark(self, tree, kind: str) -> None:
        for t in _tensors(tree):
            self.kind[t] = kind

    def is_spikes(self, tensor: torch.Tensor) -> bool:
        return self.kind.get(tensor) == SPIKES

    # --- module boundaries ----------------------------------------------------------------------

    def _pre(self, module, args):
        if id(module) not in self.paths:
            return
        self._stack.append(self.paths[id(module)])
        if isinstance(module, Synapse) and args:
            module.note_input_kind(self.is_spikes(args[0]))
        if isinstance(module, (Neuron, LIPool, Synapse, AnalogIsland)):
            self._inside += 1

    def _post(self, module, args, output):
        if id(module) not in self.paths:
            return
        self._stack.pop()
        if isinstance(module, (Neuron, LIPool, Synapse, AnalogIsland)):
            self._inside -= 1
            if isinstance(module, Neuron):
                self.mark(output, SPIKES)
            elif isinstance(module, LIPool):
                self.mark(output, SPIKES if args and self.is_spikes(args[0]) else ANALOG)
            else:
                self.mark(output, ANALOG)

    def __enter__(self):
        self._hooks = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                       nn.modules.module.register_module_forward_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return super().__exit__(*exc)

    # --- every torch function -------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._inside:
            return out
        kinds = [self.kind.get(t) for t in _tensors((args, kwargs))]
        data = [k for k in kinds if k is not None]
        if not data:  # constants only (weights, anchors, shapes)
            return out
        name = getattr(func, "__name__", str(func))
        if self._is_nonlinear(name, args, kwargs, len(data)):
            where = self._stack[-1] if self._stack else "<root>"
            self.problems.append((where, name, "non-linear function of the signal inside this module's forward"))
        self.mark(out, SPIKES if all(k == SPIKES for k in data) else ANALOG)
        return out

    def _is_nonlinear(self, name: str, args, kwargs, n_data: int) -> bool:
        if name in _NONLINEAR:
            return True
        if name in _POOLS:
            return not _kernel_is_one(args, kwargs)  # kernel 1: a strided subsample, linear
        if name in _PRODUCTS:
            return n_data >= 2
        if name in _DIVISIONS:
            divisor = args[1] if len(args) > 1 else kwargs.get("other")
            return isinstance(divisor, torch.Tensor) and divisor in self.kind
        if name in _POWERS:
            exponent = args[1] if len(args) > 1 else kwargs.get("exponent", 2)
            return name == "square" or exponent != 1
        return False

    def raise_problems(self) -> None:
        if self.problems:
            unique = list(dict.fromkeys(self.problems))
            raise UnsupportedModuleError(
                unique, "These modules compute non-linear functions in their own forward; keep them as analog "
                        "islands (convert(..., analog=[paths])) or rewrite them with spiking-convertible modules.")

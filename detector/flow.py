"""Which tensors carry spikes: a trace of the first stack of every run.

Module-level validation cannot see what a module's own ``forward`` computes. This trace watches
every torch function applied to data (tensors derived from the network input) and tells:

- for every synapse call site, whether its input is spike events (neuron outputs, possibly added,
  concatenated, upsampled or max-pooled) or an analog current (the image, another synapse's
  output, an analog island's output): synaptic operations or dense MACs;
- every non-linear function applied to data outside a neuron or analog island (a sigmoid, a
  softmax, a product of two data tensors, a functional max-pool): these would silently break
  the conversion, so the run stops with an error naming the module;
- every constant that would enter a spiking path outside a synapse's gated bias (a scalar or tensor
  addend, a non-zero ``pad`` value, a functional conv / linear / addmm with a bias, a constant
  concatenated to the signal, a functional batch norm): the runtime would inject it again in every
  time step, sleep steps included, so it is refused with the module and the operation named. A
  constant belongs in a conv / linear bias or a BatchNorm, which the converter gates.
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
# Add their second operand (or subtract it): a constant one is injected in every step.
_ADDITIONS = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
              "rsub", "subtract"}
_CONCATENATIONS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack"}
# Functional layers whose ``bias`` argument (position 2) is added to the output.
_BIASED = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
           "bilinear"}
# torch.addmm(input, a, b) = input + a @ b, and friends: ``input`` is an addend.
_ADDEND_FIRST = {"addmm", "addmv", "addbmm", "baddbmm", "addr"}
# Functions of data whose output does not depend on the data's values: constants, not signals.
_FACTORIES = {"ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like", "zeros_like",
              "new_ones", "new_full", "new_empty", "new_zeros", "new_tensor", "fill_", "fill", "size", "dim",
              "numel", "__len__", "shape"}
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
        if name in _FACTORIES:
            return out  # shaped like the signal, but a constant
        where = self._stack[-1] if self._stack else "<root>"
        if self._is_nonlinear(name, args, kwargs, len(data)):
            self.problems.append((where, name, "non-linear function of the signal inside this module's forward"))
        constant = self._constant_injected(name, args, kwargs)
        if constant:
            self.problems.append((where, name, f"{constant}: it would be injected again in every time step, sleep "
                                               "steps included (put it in a conv / linear bias or a BatchNorm)"))
        self.mark(out, SPIKES if all(k == SPIKES for k in data) else ANALOG)
        return out

    def _is_constant_nonzero(self, value) -> bool:
        if isinstance(value, torch.Tensor):
            return value not in self.kind and bool(value.detach().ne(0).any())
        return isinstance(value, (int, float, complex)) and not isinstance(value, bool) and value != 0

    def _constant_injected(self, name: str, args, kwargs) -> str | None:
        """What constant this call adds to the signal, or None."""
        if name in _ADDITIONS:
            operands = list(args[:2]) + [kwargs[k] for k in ("input", "other") if k in kwargs]
            if any(self._is_constant_nonzero(v) for v in operands):
                return "adds a constant to the signal"
        elif name in _CONCATENATIONS:
            pieces = args[0] if args else kwargs.get("tensors", ())
            if any(self._is_constant_nonzero(t) for t in pieces):
                return "concatenates a constant to the signal"
        elif name == "pad":
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            value = args[3] if len(args) > 3 else kwargs.get("value")
            if mode == "constant" and value is not None and value != 0:
                return f"pads the signal with the constant {value}"
        elif name in _BIASED:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is not None and self._is_constant_nonzero(bias):
                return "a functional layer adds its bias (not a gated Synapse)"
        elif name in _ADDEND_FIRST:
            addend = args[0] if args else kwargs.get("input")
            if self._is_constant_nonzero(addend):
                return "adds a constant matrix to the product"
        elif name in ("batch_norm", "instance_norm"):
            return "a functional normalization shifts the signal by constants"
        return None

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
                unique, "These modules compute non-linear functions of the signal, or add constants to it, in their "
                        "own forward; keep non-linear ones as analog islands (convert(..., analog=[paths])), move "
                        "constants into a conv / linear bias or a BatchNorm, or rewrite them with convertible modules.")

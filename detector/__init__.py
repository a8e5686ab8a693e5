"""Spiking object detectors by Consistent ANN-SNN Conversion (CASC).

    from detector import ClipQuan, to_qann, quantize, convert, SpikingNetwork
    qann = quantize(float_model, levels=4, batches=images)   # calibrated post-training QANN (or to_qann + QAT)
    snn = convert(qann)
    res = snn.run(x, wake=4, sleep="auto")                  # RunResult: .readout == qann(x), .steps, .settled, .stats

The names below are imported on first use (PEP 562), so ``import detector`` (and ``casc --help``) does not
import torch.
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "UnsupportedModuleError": "convert", "calibrate_thresholds": "convert", "convert": "convert", "validate": "convert",
    "RunStats": "energy", "count_macs": "energy", "fold_batchnorm": "fuse", "CIFNeuron": "neurons",
    "IFNeuron": "neurons", "LIPool": "pooling", "quantize": "calibrate", "reestimate_batchnorm": "calibrate",
    "ClipQuan": "quant", "to_qann": "quant", "ModuleRules": "rules", "register_bn_pairs": "rules",
    "register_linear_module": "rules", "register_nonlinear_module": "rules", "RunCancelled": "runtime",
    "RunResult": "runtime", "SpikingNetwork": "runtime", "StepEvent": "runtime", "Schedule": "options",
    "Selection": "options",
}

__all__ = list(_EXPORTS)


class _Package(types.ModuleType):
    """``detector.convert`` is the function, also once the submodule of that name is imported: importing a submodule
    binds it on its package, which would replace the function (an eager ``from .convert import convert`` ran last)."""

    @property
    def convert(self):
        from .convert import convert

        return convert

    @convert.setter
    def convert(self, submodule) -> None:  # the import system binding detector/convert.py: the function stays
        pass


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'detector' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

"""Spiking object detectors by Consistent ANN-SNN Conversion (CASC).

    from detector import ClipQuan, to_qann, convert, SpikingNetwork
    qann = to_qann(model, levels=4)
    snn = convert(qann)
    y = snn.run(x, wake=4, sleep="auto")
"""

from .convert import (
    UnsupportedModuleError,
    calibrate_thresholds,
    convert,
    register_linear_module,
    register_nonlinear_module,
    validate,
)
from .energy import RunStats, count_macs
from .fuse import fold_batchnorm, register_bn_pairs
from .neurons import CIFNeuron, IFNeuron
from .pooling import LIPool
from .quant import ClipQuan, to_qann
from .runtime import SpikingNetwork, StepEvent

__version__ = "0.1.0"

__all__ = [
    "ClipQuan", "to_qann", "convert", "SpikingNetwork", "StepEvent", "validate", "calibrate_thresholds",
    "UnsupportedModuleError", "register_linear_module", "register_nonlinear_module", "register_bn_pairs",
    "fold_batchnorm", "CIFNeuron", "IFNeuron", "LIPool", "RunStats", "count_macs",
]

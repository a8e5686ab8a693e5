"""Spiking object detectors by Consistent ANN-SNN Conversion (CASC).

    from detector import ClipQuan, to_qann, quantize, convert, SpikingNetwork
    qann = quantize(float_model, levels=4, batches=images)   # calibrated post-training QANN (or to_qann + QAT)
    snn = convert(qann)
    res = snn.run(x, wake=4, sleep="auto")                  # RunResult: .readout == qann(x), .steps, .settled, .stats
"""

from .convert import UnsupportedModuleError, calibrate_thresholds, convert, validate
from .energy import RunStats, count_macs
from .fuse import fold_batchnorm
from .neurons import CIFNeuron, IFNeuron
from .pooling import LIPool
from .calibrate import quantize, reestimate_batchnorm
from .quant import ClipQuan, to_qann
from .rules import ModuleRules, register_bn_pairs, register_linear_module, register_nonlinear_module
from .runtime import RunCancelled, RunResult, SpikingNetwork, StepEvent

__version__ = "0.1.0"

__all__ = [
    "ClipQuan", "to_qann", "quantize", "reestimate_batchnorm", "convert", "SpikingNetwork", "StepEvent", "RunResult",
    "RunCancelled", "validate", "calibrate_thresholds",
    "UnsupportedModuleError", "ModuleRules", "register_linear_module", "register_nonlinear_module", "register_bn_pairs",
    "fold_batchnorm", "CIFNeuron", "IFNeuron", "LIPool", "RunStats", "count_macs",
]

"""The Ultralytics classes the YOLO adapter uses, and what the converter must know about them.

Importing this module imports Ultralytics: reach it through ``ultralytics_env.ultralytics_api()``,
which makes Ultralytics offline first.
"""

from __future__ import annotations

from torch import nn
from ultralytics.nn.modules.block import C2PSA, C3, SPP, SPPF, Attention, Bottleneck, C2f, C3k, C3k2, PSABlock
from ultralytics.nn.modules.conv import Concat, Conv, DWConv
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel, yaml_model_load
from ultralytics.utils import DEFAULT_CFG_DICT

from ...rules import ModuleRules

__all__ = ["Attention", "Detect", "DetectionModel", "DEFAULT_CFG_DICT", "yaml_model_load", "SUPPORTED_LAYERS",
           "MODULE_RULES"]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    Conv, DWConv, C2f, C3, C3k2, C3k, Bottleneck, SPPF, SPP, Concat, nn.Upsample, C2PSA, PSABlock, nn.Sequential)

# The module types whose forward the converter cannot see.
MODULE_RULES = ModuleRules(
    linear=(Concat,),  # torch.cat: linear
    bn_pairs={Conv: (("conv", "bn"),)},  # Conv.forward = act(bn(conv(x))); DWConv is a Conv subclass
    nonlinear=(Attention,),  # q.k softmax products: analog island or refused
)

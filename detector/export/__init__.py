"""Deployment outside the PyTorch simulator: ONNX graphs of the QANN and of the spiking step
(``casc export``), and an ONNX Runtime engine that runs the wake-sleep schedule with them."""

from .bundle import export_graphs, read_manifest
from .detectors import attach_onnx_networks
from .engine import PROVIDERS, OrtSpikingNetwork
from .graphs import export_qann, export_steps
from .step import SpikingStep, StepExportError

__all__ = ["PROVIDERS", "OrtSpikingNetwork", "SpikingStep", "StepExportError", "attach_onnx_networks",
           "export_graphs", "export_qann", "export_steps", "read_manifest"]

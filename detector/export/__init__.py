"""Deployment outside the PyTorch simulator: ONNX graphs of the QANN and of the spiking step
(``casc export``), and an ONNX Runtime engine that runs the wake-sleep schedule with them."""

from .bundle import export_detector, read_manifest
from .detectors import load_onnx_detector
from .engine import PROVIDERS, OrtSpikingNetwork
from .graphs import export_qann, export_steps
from .step import SpikingStep, StepExportError

__all__ = ["PROVIDERS", "OrtSpikingNetwork", "SpikingStep", "StepExportError", "export_detector", "export_qann",
           "export_steps", "load_onnx_detector", "read_manifest"]

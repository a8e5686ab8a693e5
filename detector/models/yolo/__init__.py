"""Ultralytics YOLO adapter: build / train the QANN, convert it, and detect with the spiking network.

Supported: Ultralytics *detection* models with the anchor-free ``Detect`` head built from ``Conv``, ``C2f``,
``C3``, ``C3k2``, ``Bottleneck``, ``SPPF``/``SPP``, ``Concat`` and ``Upsample`` layers: YOLOv8, YOLOv5u and
YOLOv3u at every scale (n-x), and YOLO11 (its ``C2PSA`` attention kept as analog islands, opt-in with
``analog="auto"``). Segment / pose / OBB heads, YOLO-World, YOLOE, RT-DETR, YOLOv9/v10/12/26 are refused
with an error that says so.

    qann = build_qann("yolov8n.yaml", levels=4, act="relu")        # Ultralytics DetectionModel, ClipQuan acts
    det = SpikingYOLO.from_model(qann, imgsz=640)                   # or SpikingYOLO.from_checkpoint(path)
    results = det.predict(["bus.jpg"])                              # list of Results (detector.detect)
    for event in det.stream("bus.jpg"): ...                         # anytime detection, one event per step

The modules: ``model`` (the support check, building and quantizing the QANN, checkpoints, ``module_rules()``),
``spiking`` (``SpikingYOLO``, the readout network, letterboxing, decoding), ``ultralytics_env`` (the offline
set-up) and ``ultralytics_api`` (the Ultralytics classes used, and the converter's rules for them).

Importing this package neither imports Ultralytics nor changes the environment: what needs Ultralytics calls
``prepare_ultralytics()`` first (``YOLO_OFFLINE``, ``YOLO_AUTOINSTALL``, ``YOLO_CONFIG_DIR``, fonts; see
``detector.models.yolo.ultralytics_env``). Call it yourself before importing ``ultralytics`` directly.
"""

from .model import (
    ACTIVATIONS,
    CHECKPOINT_FORMAT,
    UnsupportedModelError,
    build_qann,
    check_supported,
    export_checkpoint,
    load_checkpoint,
    model_act,
    module_rules,
    quantize_model,
    save_qann,
    ultralytics_start_checkpoint,
)
from .spiking import (SpikingYOLO, YOLOReadoutNet, attention_paths, calibration_inputs, layer_part, letterbox,
                      quantize_checkpoint)
from .ultralytics_env import prepare_ultralytics

__all__ = [
    "SpikingYOLO", "UnsupportedModelError", "build_qann", "load_checkpoint",
    "export_checkpoint", "check_supported", "attention_paths", "YOLOReadoutNet", "CHECKPOINT_FORMAT",
    "calibration_inputs", "save_qann", "letterbox", "ultralytics_start_checkpoint",
    "quantize_model", "model_act", "ACTIVATIONS", "module_rules", "prepare_ultralytics", "layer_part",
    "quantize_checkpoint",
]

"""torchvision Faster R-CNN -> quantized ANN -> two-stage spiking detector.

    from detector.models.rcnn import SpikingFasterRCNN
    det = SpikingFasterRCNN.from_checkpoint("fasterrcnn.pth", arch="resnet50_fpn", levels=4)
    qann = quantize_fasterrcnn(float_model, levels=4, images=rgb_images)    # calibrated, no labels
    det = SpikingFasterRCNN.from_model(qann, classes=names)
    results = det.predict(["street.jpg"])          # [Results]: .boxes (0-based cls), .steps, .stage_steps, ...
    for event in det.stream("street.jpg"):         # stage-1 steps, then stage-2 steps with detections
        ...
    dets, info = det.detections_at_steps(images, [1, 2, 4, 8, 16, 32])  # anytime detections, one pass
    base = SpikingFasterRCNN.from_model(float_model, neuron="if", calibration=images)  # IF baseline
    base.predict(images, wake=32)                  # wake=T, no sleep; base.qann_predict = the float ANN

The modules: ``model`` (building the torchvision model and its QANN form, checkpoints, calibration inputs,
``MODULE_RULES``: what the converter must know about torchvision's modules), ``spiking``
(``SpikingFasterRCNN``: the two stages, proposals and decoding) and ``anytime`` (the stages step by step:
``stream`` events and anytime detections).
"""

from .model import (
    ARCHS,
    CHECKPOINT_FORMAT,
    MODULE_RULES,
    ReLUTwoMLPHead,
    _unwrap_state_dict,
    add_spiking_fpn,
    analog_candidates,
    build_fasterrcnn,
    build_qann_fasterrcnn,
    calibration_inputs,
    float_for_calibration,
    has_spiking_fpn,
    is_qann_state,
    load_checkpoint,
    load_float_for_calibration,
    model_from_state_dict,
    quantize_fasterrcnn,
    save_checkpoint,
    save_qann,
    to_qann_fasterrcnn,
)
from .spiking import RCNNStage1, RCNNStage2, SpikingFasterRCNN, class_names, layer_part, quantize_checkpoint

__all__ = [
    "SpikingFasterRCNN", "RCNNStage1", "RCNNStage2", "ReLUTwoMLPHead", "ARCHS", "CHECKPOINT_FORMAT", "MODULE_RULES",
    "build_fasterrcnn", "build_qann_fasterrcnn", "to_qann_fasterrcnn", "analog_candidates", "load_checkpoint",
    "model_from_state_dict", "save_checkpoint", "load_float_for_calibration", "calibration_inputs", "save_qann",
    "class_names", "add_spiking_fpn", "has_spiking_fpn", "is_qann_state", "float_for_calibration",
    "quantize_fasterrcnn", "layer_part", "quantize_checkpoint",
]

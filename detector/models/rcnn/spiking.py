"""The spiking Faster R-CNN: two spiking stages around torchvision's own decoding code (``docs/method.md`` §5).

Pipeline of one image batch:

1. ``model.transform`` (GeneralizedRCNNTransform: resize + normalize + pad) — analog preprocessing.
2. **Stage 1** (one SpikingNetwork): ResNet body + FPN + RPN head. Its readouts are the FPN
   feature maps, the objectness maps and the box deltas of every level (accumulated over the
   wake and sleep steps, divided by the wake count).
3. Proposals from those readouts with torchvision's own code (``rpn.anchor_generator``,
   ``rpn.box_coder``, ``rpn.filter_proposals``).
4. ``roi_heads.box_roi_pool`` (RoIAlign, linear) on the stage-1 readout features.
5. **Stage 2** (a second SpikingNetwork, its own wake/sleep schedule): box head + box predictor on
   the RoI features, one row per proposal.
6. ``roi_heads.postprocess_detections`` and ``transform.postprocess``: boxes, scores and labels in
   original image coordinates (torchvision's labels are 1-based, 0 the background; ``Results`` classes
   are 0-based), then ``conf`` / an extra class-wise NMS at ``iou`` / ``max_det`` / ``classes``.

With ``wake = L`` and ``sleep="auto"`` in both stages, every readout equals the QANN's output, so
proposals and detections equal the QANN's (float64; ``docs/method.md`` §4 on float32). Both stages are
converted with the adapter's ``MODULE_RULES`` (``detector.models.rcnn.model``); their step-by-step runs
(``stream``, ``detections_at_steps``) are in ``detector.models.rcnn.anytime``.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import batched_nms
from torchvision.ops.misc import SqueezeExcitation

from ...convert import UnsupportedModuleError, convert
from ...neuron_kinds import neuron_kind
from ...detect import Batch, Boxes, Results, RunFigures, Schedule, Selection, SpikingDetector, read_bgr
from ...detect.base import source_path
from ...quant import ClipQuan, qann_levels
from ...runtime import SpikingNetwork
from .anytime import TwoStageSteps
from .model import (MODULE_RULES, ReLUTwoMLPHead, _to_image_tensor, _unwrap_state_dict, add_spiking_fpn,
                    calibration_inputs, float_for_calibration, is_qann_state, load_checkpoint, model_from_state_dict,
                    quantize_fasterrcnn, save_qann, to_qann_fasterrcnn)


class RCNNStage1(nn.Module):
    """Backbone + FPN + RPN head: image tensor -> (features, objectness per level, deltas per level)."""

    def __init__(self, backbone: nn.Module, rpn_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.rpn_head = rpn_head

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        objectness, deltas = self.rpn_head(list(features.values()))
        return features, objectness, deltas


class RCNNStage2(nn.Module):
    """Box head + box predictor: RoI features [R, C, 7, 7] -> (class logits, box regression)."""

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module):
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor

    def forward(self, roi_features: torch.Tensor):
        return self.box_predictor(self.box_head(roi_features))


def _split_analog(analog: Iterable[str]) -> tuple[list[str], list[str]]:
    """Model paths -> (stage-1 paths, stage-2 paths)."""
    stage1, stage2 = [], []
    for path in analog:
        if path.startswith("backbone."):
            stage1.append(path)
        elif path.startswith("rpn.head."):
            stage1.append("rpn_head." + path[len("rpn.head."):])
        elif path.startswith("roi_heads.box_head.") or path.startswith("roi_heads.box_predictor."):
            stage2.append(path[len("roi_heads."):])
        else:
            raise ValueError(f"analog path {path!r} is not inside backbone, rpn.head, roi_heads.box_head or "
                             "roi_heads.box_predictor (the spiking parts of Faster R-CNN)")
    return stage1, stage2


def layer_part(site: str) -> str:
    """Stage 1 (backbone, FPN, RPN) or stage 2 (box head): where a neuron call site (its module path) belongs."""
    if site.startswith(("roi_heads", "box_head", "stage2")):
        return "stage 2: box head"
    if site.startswith(("rpn", "rpn_head")):
        return "stage 1: RPN"
    if ".fpn" in site or site.startswith("fpn"):
        return "stage 1: FPN"
    return "stage 1: backbone"


class SpikingFasterRCNN(TwoStageSteps, SpikingDetector, nn.Module):
    """Two spiking stages around torchvision's own Faster R-CNN decoding code.

    ``qann``: a quantized torchvision Faster R-CNN (``build_qann_fasterrcnn``, ``to_qann_fasterrcnn``),
    converted with CIF neurons and the wake-sleep schedule (``neuron="cif"``, CASC). With
    ``neuron="if"`` it is the **IF baseline** (``docs/method.md`` §7): ``qann`` is then
    normally a *float* ReLU Faster R-CNN (a QANN is accepted too: its ClipQuan sites get IF neurons with
    calibrated thresholds, like ReLUs), every ReLU call site gets a plain IF neuron (soft reset) whose
    threshold is the ``percentile`` of that site's activations on the ``calibration`` images (a list of
    images, anything ``preprocess`` accepts); stage 2 is calibrated on the RoI features that the float
    network itself computes on those images (same proposal / RoIAlign path). Its schedule is ``wake=T``,
    no sleep; ``levels`` is None, so ``wake`` must be given. ``TwoMLPHead`` is swapped for
    ``ReLUTwoMLPHead`` (on a copy) so that its ReLUs get IF neurons.
    ``analog``: module paths of the Faster R-CNN (e.g. ``"backbone.body.features.1.block.1"``) to keep
    as analog islands (MobileNetV3's Hardswish / squeeze-excitation; see ``analog_candidates``).
    ``self.qann`` is the network converted from (the QANN, or the float model for the IF baseline).
    Numpy images are RGB (torchvision's convention) unless ``color="bgr"``; tensors are CHW in [0, 1].
    """

    color = "rgb"

    def __init__(self, qann: nn.Module, analog: Iterable[str] = (), classes: list[str] | None = None,
                 meta: dict | None = None, neuron: str = "cif", calibration: Iterable[Any] | None = None,
                 percentile: float = 99.9, calibration_batch: int = 4):
        super().__init__()
        for attr in ("transform", "backbone", "rpn", "roi_heads"):
            if not hasattr(qann, attr):
                raise TypeError(f"expected a torchvision GeneralizedRCNN (FasterRCNN), got {type(qann).__name__}")
        kind = neuron_kind(neuron)
        extra_heads = [head for head, has in (("mask", "has_mask"), ("keypoint", "has_keypoint"))
                       if getattr(qann.roi_heads, has, lambda: False)()]
        if extra_heads:
            raise ValueError(f"SpikingFasterRCNN converts box detection only, and this {type(qann).__name__} has a "
                             f"{' and a '.join(extra_heads)} head whose outputs would be dropped: use a FasterRCNN, or "
                             f"set roi_heads.{extra_heads[0]}_roi_pool / _head / _predictor to None for boxes only")
        signed = [m for m in qann.modules() if isinstance(m, ClipQuan) and m.signed]
        if not kind.converts_float and not kind.signed and signed:
            raise ValueError(f"{kind.label} neurons fire positive spikes only, and this model has {len(signed)} signed "
                             "quantizers (a spiking FPN), which need negative spikes: compare QCFS on a model "
                             "without --spiking-fpn (e.g. rcnn-r18-bundled)")
        if not kind.converts_float:
            if type(qann.roi_heads.box_head) is tv_frcnn.TwoMLPHead or qann_levels(qann) is None:
                raise ValueError("SpikingFasterRCNN needs a QANN: calibrate one with quantize_fasterrcnn(model, levels, "
                                 "images) or build one with to_qann_fasterrcnn(model, levels) (both also replace "
                                 "TwoMLPHead's functional ReLUs); for the IF baseline on a float model pass "
                                 'neuron="if", calibration=images')
        else:
            if calibration is None:
                raise ValueError('neuron="if" (the IF baseline) needs calibration=images: a few images whose '
                                 "activations set each call site's threshold (the percentile)")
            if type(qann.roi_heads.box_head) is tv_frcnn.TwoMLPHead:  # functional ReLUs -> modules, on a copy
                qann = copy.deepcopy(qann)
                qann.roi_heads.box_head = ReLUTwoMLPHead.from_head(qann.roi_heads.box_head)
        self.qann = qann.eval()
        self.neuron = neuron
        self.levels = None if kind.converts_float else qann_levels(qann)
        self.percentile = percentile if kind.converts_float else None
        self.classes = list(classes) if classes else None
        self.names = class_names(self.classes, qann.roi_heads.box_predictor.cls_score.out_features - 1)
        self.meta = dict(meta or {})
        analog = list(analog)
        a1, a2 = _split_analog(analog)
        self.analog = analog
        self.qann_stage1 = RCNNStage1(qann.backbone, qann.rpn.head)
        self.qann_stage2 = RCNNStage2(qann.roi_heads.box_head, qann.roi_heads.box_predictor)
        try:
            if not kind.converts_float:  # CASC, or QCFS neurons on the same QANN
                self.stage1: SpikingNetwork = convert(self.qann_stage1, neuron=neuron, analog=a1, rules=MODULE_RULES)
                self.stage2: SpikingNetwork = convert(self.qann_stage2, neuron=neuron, analog=a2, rules=MODULE_RULES)
            else:
                batches1, batches2 = self._calibration_batches(calibration, calibration_batch)
                self.stage1 = convert(self.qann_stage1, neuron=neuron, calibration=batches1, percentile=percentile,
                                      analog=a1, rules=MODULE_RULES)
                self.stage2 = convert(self.qann_stage2, neuron=neuron, calibration=batches2, percentile=percentile,
                                      analog=a2, rules=MODULE_RULES)
        except UnsupportedModuleError as error:
            hint = ""
            if any("mobilenet" in type(m).__name__.lower() or isinstance(m, SqueezeExcitation) for m in qann.modules()):
                hint = ("\nMobileNetV3 backbones use Hardswish and squeeze-excitation, which cannot spike. Keep them "
                        "as analog islands: SpikingFasterRCNN.from_model(qann, analog=analog_candidates(qann)) "
                        "(the fraction of MACs left analog is reported in the run statistics).")
            raise UnsupportedModuleError(error.problems, "Faster R-CNN: these modules cannot spike; name them in "
                                         "analog=[...] (paths of the Faster R-CNN) to keep them analog." + hint) from None

    @torch.no_grad()
    def _calibration_batches(self, images, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(preprocessed image batches for stage 1, RoI feature batches for stage 2), the latter computed by
        the float network through the same proposal / RoIAlign path."""
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError('neuron="if": calibration=images is empty')
        images = self._items(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"calibration_batch must be an integer >= 1, got {batch_size!r}")
        batches1, batches2 = [], []
        with _eval_mode(self.qann):
            for i in range(0, len(images), batch_size):
                image_list, _ = self.preprocess(images[i:i + batch_size])
                features, objectness, deltas = self.qann_stage1(image_list.tensors)
                features = OrderedDict(features)
                proposals = self.proposals(image_list, features, objectness, deltas)
                rois = self.roi_features(features, proposals, image_list)
                batches1.append(image_list.tensors)
                if rois.shape[0]:
                    batches2.append(rois)
        if not batches2:
            raise ValueError('neuron="if": the calibration images gave no proposals, so stage 2 (box head) '
                             "cannot be calibrated; give other / more images")
        return batches1, batches2

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, levels: int | None = None, analog: Iterable[str] = (),
                   classes: list[str] | None = None, neuron: str = "cif", calibration: Iterable[Any] | None = None,
                   percentile: float = 99.9) -> "SpikingFasterRCNN":
        """From a QANN Faster R-CNN, or from a float one when ``levels`` is given (quantized on a copy).

        ``neuron="if"``: the IF baseline of a float ReLU model (or of a QANN), thresholds = ``percentile`` of
        each call site's activations on the ``calibration`` images; ``levels`` must then be None.
        """
        if neuron_kind(neuron).converts_float:
            if levels is not None:
                raise ValueError('from_model(neuron="if"): the IF baseline converts the float model as it is; '
                                 "levels=... (quantization) applies to CASC only")
            return cls(model, analog=analog, classes=classes, neuron=neuron, calibration=calibration,
                       percentile=percentile)
        if qann_levels(model) is None:
            if levels is None:
                raise ValueError("from_model: the model is not a QANN; pass levels=... to quantize it "
                                 '(or use to_qann_fasterrcnn), or neuron="if", calibration=images for the IF baseline')
            model = to_qann_fasterrcnn(model, levels)
        return cls(model, analog=analog, classes=classes, neuron=neuron)

    @classmethod
    def from_checkpoint(cls, path: str | Path, arch: str | None = None, num_classes: int | None = None,
                        levels: int | None = None, sha256: str | None = None, analog: Iterable[str] = (),
                        classes: list[str] | None = None, neuron: str = "cif",
                        calibration: Iterable[Any] | None = None, percentile: float = 99.9,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **build_kwargs) -> "SpikingFasterRCNN":
        """From a state-dict file: our training checkpoint (arch, classes, sizes, levels from its metadata), a
        torchvision float state dict (``arch`` / ``num_classes`` as given or inferred from the box predictor;
        quantized with ``levels``, default 4), or a torchvision reference checkpoint (``{"model": ...}``).
        A QANN checkpoint keeps its own levels (asking for other ``levels`` is an error).
        ``neuron="if"``: the IF baseline; a float checkpoint is not quantized (``levels`` must be None) and
        ``calibration`` images set the thresholds (see the class docstring).
        ``sha256`` is checked before loading. ``build_kwargs`` go to ``build_fasterrcnn``
        (e.g. ``min_size``, ``max_size``, ``rpn_post_nms_top_n_test``). The model is moved to ``device`` and
        ``dtype`` before it is converted, so BatchNorms fold in that precision (folded in float32 and then cast
        to float64, a layer is off by 1e-7 and no longer reproduces the float64 QANN exactly).
        """
        converts_float = neuron_kind(neuron).converts_float
        if converts_float and levels is not None:
            raise ValueError('from_checkpoint(neuron="if"): levels=... (quantization) applies to CASC only')
        if converts_float and calibration is None:  # fail before loading
            raise ValueError('neuron="if" (the IF baseline) needs calibration=images: a few images whose '
                             "activations set each call site's threshold (the percentile)")
        data = load_checkpoint(path, sha256)
        state, meta = _unwrap_state_dict(data)
        if not is_qann_state(state) and levels is None and not converts_float:
            levels = 4
        qann = model_from_state_dict(state, meta, arch=arch, num_classes=num_classes, levels=levels, **build_kwargs)
        qann = qann.to(device=device, dtype=dtype)
        return cls(qann, analog=analog, classes=classes or meta.get("classes"), meta=meta, neuron=neuron,
                   calibration=calibration, percentile=percentile)

    # --- pipeline pieces ---------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.qann.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.qann.parameters()).device

    def _split_tensor(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() == 4:
            return list(x)
        return [x]

    def _prepare(self, items, color: str) -> Batch:
        """Images -> ``Batch`` whose ``x`` is the ImageList after GeneralizedRCNNTransform."""
        images = [None if isinstance(item, torch.Tensor) else read_bgr(item, color) for item in items]
        tensors = [_to_image_tensor(item if bgr is None else bgr[..., ::-1]).to(device=self.device, dtype=self.dtype)
                   for item, bgr in zip(items, images)]
        with _eval_mode(self.qann.transform) as transform:
            image_list, _ = transform(tensors)
        return Batch(image_list, [tuple(t.shape[-2:]) for t in tensors], images, [source_path(i) for i in items])

    def proposals(self, image_list, features, objectness, deltas) -> list[torch.Tensor]:
        """torchvision's RPN decoding (anchors, box coder, filter_proposals) on given head outputs."""
        rpn = self.qann.rpn
        feature_list = list(features.values())
        anchors = rpn.anchor_generator(image_list, feature_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        obj, pred = concat_box_prediction_layers(list(objectness), list(deltas))
        boxes = rpn.box_coder.decode(pred.detach(), anchors).view(num_images, -1, 4)
        with _eval_mode(rpn):
            kept, _ = rpn.filter_proposals(boxes, obj, image_list.image_sizes, num_anchors_per_level)
        return kept

    def roi_features(self, features, proposals, image_list) -> torch.Tensor:
        return self.qann.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)

    def decode(self, class_logits, box_regression, proposals, image_list, original_sizes,
               score_thresh: float | None = None) -> list[dict]:
        """torchvision's box decoding: per image ``{"boxes", "scores", "labels"}`` (labels 1-based, 0 the
        background) in original pixels; ``score_thresh`` None keeps the model's own."""
        heads = self.qann.roi_heads
        saved = heads.score_thresh
        if score_thresh is not None:
            heads.score_thresh = score_thresh
        try:
            boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals,
                                                                 image_list.image_sizes)
        finally:
            heads.score_thresh = saved
        result = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        return self.qann.transform.postprocess(result, image_list.image_sizes, original_sizes)

    def _empty_stage2(self, like: torch.Tensor):
        n = self.qann.roi_heads.box_predictor.cls_score.out_features
        return like.new_zeros((0, n)), like.new_zeros((0, 4 * n))

    def _stages(self, image_list, schedule: Schedule | None, cancel: threading.Event | None = None,
                session: dict | None = None) -> dict:
        """Both stages and the glue between them (proposals, RoIAlign): spiking with ``schedule``, else the
        network converted from. ``runs``: the stages' ``RunResult``s (none for the QANN; stage 2 runs only
        when some image has a proposal). ``session``: a video's delta sessions (``_video_session``)."""
        runs = []
        if schedule is None:
            features, objectness, deltas = self.qann_stage1(image_list.tensors)
        else:
            if session is not None:
                runs.append(session["stage1"].run(image_list.tensors, cancel=cancel))
            else:
                runs.append(self.stage1.run(image_list.tensors, mode=schedule.mode, cancel=cancel,
                                            **schedule.run_kwargs()))
            features, objectness, deltas = runs[0].readout
        features = OrderedDict(features)
        proposals = self.proposals(image_list, features, objectness, deltas)
        rois = self.roi_features(features, proposals, image_list)
        if not rois.shape[0]:
            logits, regression = self._empty_stage2(rois)
        elif schedule is None:
            logits, regression = self.qann_stage2(rois)
        elif session is not None and session["stage2"] is not None:
            runs.append(session["stage2"].run(rois, cancel=cancel))
            logits, regression = runs[1].readout
        else:
            runs.append(self.stage2.run(rois, mode=schedule.mode, cancel=cancel, **schedule.run_kwargs()))
            logits, regression = runs[1].readout
        return {"features": features, "objectness": objectness, "deltas": deltas, "proposals": proposals,
                "class_logits": logits, "box_regression": regression, "runs": runs}

    def _infer(self, batch: Batch, schedule: Schedule | None, cancel, session=None) -> dict:
        with _eval_mode(self.qann):
            return {**self._stages(batch.x, schedule, cancel, session), "wake": schedule.wake if schedule else None}

    def _video_session(self, schedule: Schedule, keyframe_every: int | None, stage2_delta: bool = False) -> dict:
        """Stage 1 (backbone, FPN, RPN head) by delta frames; stage 2 runs fresh on each frame's RoIs, or by delta
        when ``stage2_delta`` (exact either way: its input is each frame's RoI features, whatever they hold; a
        change in the number of RoIs makes that frame a keyframe). ``benchmarks/video.py`` measures both."""
        options = dict(wake=schedule.wake, burst=schedule.burst, max_sleep=schedule.max_sleep, mode=schedule.mode,
                       keyframe_every=keyframe_every)
        return {"stage1": self.stage1.session(**options),
                "stage2": self.stage2.session(**options) if stage2_delta else None}

    def _results(self, batch: Batch, out: dict, keep: Selection,
                 runs: Sequence[RunFigures] | None = None) -> list[Results]:
        """Decoded detections as ``Results``: score above ``conf``, an extra class-wise NMS at ``iou`` (on top
        of the model's own), at most ``max_det``, only ``classes``; classes 0-based; each with its spiking run's
        figures (``runs``; None: the QANN's)."""
        dets = self.decode(out["class_logits"], out["box_regression"], out["proposals"], batch.x, batch.shapes,
                           keep.conf)
        results = []
        for i, det in enumerate(dets):
            boxes = Boxes(det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu() - 1, batch.shapes[i])
            if keep.classes is not None:
                boxes = boxes.select(torch.isin(boxes.cls, torch.tensor(keep.classes)))
            boxes = boxes.select(batched_nms(boxes.xyxy, boxes.conf, boxes.cls, keep.iou)[:keep.max_det])
            results.append(batch.result(i, boxes, self.names, runs[i] if runs else None))
        return results

    def _postprocess(self, batch: Batch, out: dict, keep: Selection) -> list[Results]:
        runs = None
        if out["runs"]:
            run1, run2 = (out["runs"] + [None])[:2]
            runs = self._figures(out["proposals"], run1, run2, out["wake"])
        return self._results(batch, out, keep, runs)

    # --- public API ----------------------------------------------------------------------------

    @torch.no_grad()
    def internals(self, images, spiking: bool = True, **schedule) -> dict:
        """The intermediate outputs of one image batch: ``features``, ``objectness``, ``deltas``, ``proposals``,
        ``class_logits``, ``box_regression`` of the spiking stages (``spiking=True``, with ``schedule`` as for
        ``predict``) or of the network converted from (``spiking=False``), plus ``runs`` (the stages'
        ``RunResult``s; empty for the QANN)."""
        image_list, _ = self.preprocess(images)
        with _eval_mode(self.qann):
            return self._stages(image_list, self.schedule(**schedule) if spiking else None)

    # -- input geometry and description (what a server needs to size and describe its work) --

    @property
    def architecture(self) -> str:
        return str(self.meta.get("arch") or "fasterrcnn")

    def _resize_scale(self, size: tuple[int, int]) -> float:
        transform = self.qann.transform
        return min(float(transform.min_size[-1]) / min(size), float(transform.max_size) / max(size))

    def fit_box(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (w, h) an image of ``size`` is resized to by torchvision's transform (decoding straight to it loses
        nothing)."""
        scale = self._resize_scale(size)
        return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) after torchvision's resize, floor(side * scale) (a side of 0 would make it fail)."""
        scale = self._resize_scale(size)
        return int(size[0] * scale), int(size[1] * scale)

    def export_networks(self, imgsz: int | None, batch: int, dtype: torch.dtype) -> tuple[int, dict]:
        """(input size, {stage: (spiking network, the QANN part it reproduces, example input)}) for ``casc export``.
        Stage 1 sees the padded image batch (default: the transform's max size padded to 32); stage 2 every
        image's RoIs (the RPN keeps at most post_nms_top_n per image), RoIAligned to the box head's input."""
        stride = 32  # torchvision pads every image batch to a multiple of 32
        imgsz = imgsz or -(-int(self.qann.transform.max_size) // stride) * stride
        if imgsz % stride:
            raise ValueError(f"imgsz {imgsz} must be a multiple of {stride} for Faster R-CNN")
        qann = self.qann
        images = torch.zeros(batch, 3, imgsz, imgsz, dtype=dtype)
        pool = qann.roi_heads.box_roi_pool
        size = pool.output_size if isinstance(pool.output_size, (tuple, list)) else (pool.output_size,) * 2
        rois = torch.zeros(batch * qann.rpn.post_nms_top_n(), qann.backbone.out_channels, *size, dtype=dtype)
        return imgsz, {"stage1": (self.stage1, self.qann_stage1, images), "stage2": (self.stage2, self.qann_stage2, rois)}

    def forward(self, images, **kwargs):
        return self.predict(images, **kwargs)


def class_names(classes: list[str] | None, n: int) -> dict[int, str]:
    """0-based class id -> name for ``n`` classes (torchvision's label ``k`` is class ``k - 1``; 0 is the
    background); without ``classes`` the ids are named by their number. A list of another length is an error."""
    if classes and len(classes) != n:
        raise ValueError(f"classes: {len(classes)} names for a model with {n} classes (its box predictor has {n + 1} "
                         f"outputs, the first the background): give one name per class, background excluded")
    return {i: str(classes[i]) if classes else str(i) for i in range(n)}


def quantize_checkpoint(path: str | Path, sha256: str | None, rgb_images: list, out: str | Path,
                        levels: int, batch: int = 8, names: list[str] | None = None, spiking_fpn: bool = False,
                        min_size: int | None = None, max_size: int | None = None, **calibration) -> Path:
    """The QANN of the float checkpoint ``path``, calibrated on ``rgb_images`` (no labels) by
    ``quantize_fasterrcnn`` (``calibration``: theta, percentile, rounding, first_levels) and written to ``out``.

    ``spiking_fpn``: also quantize the FPN's signed signals (``add_spiking_fpn``); ``path`` may then be a QANN
    already, which gets only those quantizers. ``min_size`` / ``max_size``: the input sizes, for a torchvision
    state dict that does not record them. ``names``: the class names to store (default: the checkpoint's)."""
    state, meta = _unwrap_state_dict(load_checkpoint(path, sha256))
    meta = dict(meta, **{k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v})
    if is_qann_state(state):
        if not spiking_fpn:
            raise ValueError(f"{path} is already a QANN; quantize the float checkpoint it came from")
        qann = model_from_state_dict(state, meta, levels=None).eval()
    else:
        float_model, meta = float_for_calibration(state, meta)
        qann = quantize_fasterrcnn(float_model, levels, rgb_images, batch, **calibration)
    if spiking_fpn:
        qann = add_spiking_fpn(qann, calibration=calibration_inputs(rgb_images, batch), inplace=True)
    class_names(names, qann.roi_heads.box_predictor.cls_score.out_features - 1)  # a wrong length fails here
    return save_qann(qann, out, dict(meta, spiking_fpn=spiking_fpn, **({"classes": names} if names else {})))


@contextmanager
def _eval_mode(module: nn.Module):
    """``module`` in eval mode for the block (torchvision's transform and RPN behave differently in training)."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)

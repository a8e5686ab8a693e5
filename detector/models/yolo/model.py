"""The Ultralytics YOLO model and its QANN form: the support check, building, quantizing, checkpoints.

Checkpoints: ``export_checkpoint`` writes this project's safe format (``torch.load(weights_only=True)``:
state_dict plus plain metadata); ``load_checkpoint`` reads it (verifying a sha256 when given) and also
Ultralytics ``.pt`` files, which are pickles of the model: those load with ``weights_only=True`` too, under an
allowlist of the classes they hold (``pt_files``); a file that names anything else is refused.

Every function that needs Ultralytics gets it through ``ultralytics_api()`` (offline set-up first).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ... import checkpoint
from ...checkpoint import CheckpointError, UnreadableCheckpoint
from ...detect import SpikingDetector
from ...quant import ClipQuan, activation_references, qann_levels, to_qann, with_legacy_quant_state
from ...rules import ModuleRules
from .pt_files import load_ultralytics_file
from .ultralytics_env import ultralytics_api

if TYPE_CHECKING:
    from ultralytics.nn.tasks import DetectionModel

CHECKPOINT_FORMAT = "casc-yolo"
CHECKPOINT_VERSION = 2  # 2: ClipQuan levels and rounding per module in the state dict (1: all floor)
SUPPORTED_TEXT = ("supported: Ultralytics detection models with the plain Detect head - YOLOv8, YOLOv5u, YOLOv3u "
                  "(any scale n-x) and YOLO11 (C2PSA attention as analog islands, analog='auto'); not "
                  "segment/pose/OBB/classify heads, YOLO-World/YOLOE, RT-DETR, YOLOv6/v9/v10/12/26 or end-to-end heads")
ACTIVATIONS = {"relu": "nn.ReLU()", "silu": "nn.SiLU()"}


def module_rules() -> ModuleRules:
    """What the converter must know about Ultralytics' modules: ``Concat`` is linear, ``Conv``'s (conv, bn)
    pair folds, ``Attention`` is non-linear (``convert(..., rules=module_rules())``)."""
    return ultralytics_api().MODULE_RULES


class UnsupportedModelError(ValueError):
    """The model is not a YOLO detection model this adapter can convert (the message says what is)."""


# --- building the QANN ----------------------------------------------------------------------------------

def _yaml_dict(model: str | Path | dict) -> dict:
    if isinstance(model, dict):
        return copy.deepcopy(model)
    name = str(model)
    path = Path(name)
    if path.suffix not in {".yaml", ".yml"}:
        raise ValueError(f"not a model YAML: {name}")
    if path.parent != Path(".") and not path.exists():
        raise FileNotFoundError(f"model YAML not found: {name}")
    try:
        return ultralytics_api().yaml_model_load(name)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"model YAML not found: {name} (neither a file nor a bundled Ultralytics "
                                f"config such as yolov8n.yaml)") from error


def _check_yaml(d: dict) -> None:
    try:
        head_type = str(d["head"][-1][2])
    except (KeyError, IndexError, TypeError) as error:
        raise UnsupportedModelError(f"not an Ultralytics model YAML (no head); {SUPPORTED_TEXT}") from error
    if head_type != "Detect" or d.get("end2end"):
        what = "end-to-end Detect" if head_type == "Detect" else head_type
        raise UnsupportedModelError(f"unsupported model family: its head is {what}; {SUPPORTED_TEXT}")


def check_supported(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` unless ``model`` is a supported Ultralytics detection model."""
    api = ultralytics_api()
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not len(layers):
        raise UnsupportedModelError(f"{type(model).__name__} is not an Ultralytics DetectionModel; {SUPPORTED_TEXT}")
    head = layers[-1]
    if type(head) is not api.Detect:
        raise UnsupportedModelError(f"unsupported model family: its head is {type(head).__name__}; {SUPPORTED_TEXT}")
    if getattr(head, "one2one_cv2", None) is not None or head.cv2 is None:
        raise UnsupportedModelError(f"unsupported model family: end-to-end (NMS-free) Detect head; {SUPPORTED_TEXT}")
    bad = [f"{i}:{type(m).__name__}" for i, m in enumerate(layers[:-1]) if type(m) not in api.SUPPORTED_LAYERS]
    if bad:
        raise UnsupportedModelError(f"unsupported layers {', '.join(bad)}; {SUPPORTED_TEXT}")


def _casc_meta(model: nn.Module) -> dict:
    return dict(getattr(model, "yaml", {}).get("casc", {}))


def _set_activation(model: nn.Module, act: str) -> None:
    """Swap every SiLU/ReLU module for ``act`` (a float model only; fine-tune afterwards)."""
    new = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
    for parent, name, _ in activation_references(model, (nn.ReLU, nn.SiLU)):
        if not isinstance(getattr(parent, name), new):
            setattr(parent, name, new())
    model.yaml["activation"] = ACTIVATIONS[act]


def model_act(model: nn.Module) -> str:
    meta = _casc_meta(model)
    if meta.get("act"):
        return meta["act"]
    kinds = {type(m) for m in model.modules()}
    return "relu" if nn.ReLU in kinds and nn.SiLU not in kinds else "silu"


def quantize_model(model: DetectionModel, levels: int | None, act: str, learnable: bool = False,
              calibration: list[torch.Tensor] | None = None) -> DetectionModel:
    """Ultralytics model -> QANN in place (every activation call site gets its own ClipQuan)."""
    existing = qann_levels(model)
    if any(isinstance(m, ClipQuan) for m in model.modules()):
        if levels is not None and existing is not None and levels != existing:
            raise ValueError(f"the model is already quantized with {existing} levels, not {levels}")
        levels = existing
    else:
        if levels is None:
            raise ValueError("a float model needs levels=L to be quantized (then fine-tune it: casc train yolo)")
        to_qann(model, levels, learnable=learnable, inplace=True, calibration=calibration)
    model.yaml["casc"] = {"levels": int(levels), "act": act, "quantized": True}
    return model


def build_qann(model: str | Path | dict | nn.Module = "yolov8n.yaml", levels: int | None = 4, act: str | None = None,
               nc: int | None = None, quantize: bool = True, learnable: bool = False,
               verbose: bool = False) -> DetectionModel:
    """An Ultralytics ``DetectionModel`` whose activations are ``ClipQuan(levels)`` (the QANN).

    ``model``: a YAML name/path (``yolov8n.yaml``, ``yolov5nu.yaml``, ``yolo11s.yaml``, ...; the scale letter
    picks the scale), a YAML dict, a checkpoint (``.pt`` of Ultralytics - a pickle, trusted files only - or
    this project's format), or a ``DetectionModel`` (copied). ``act``: ``"relu"`` or ``"silu"`` for the
    float activation (a YAML's own default is SiLU); ``quantize=False`` returns the float model (e.g. the
    float ReLU network for the IF baseline). ``nc`` overrides the class count of a YAML.
    """
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
        if not hasattr(net, "yaml"):
            raise UnsupportedModelError(f"{type(model).__name__} is not an Ultralytics DetectionModel; {SUPPORTED_TEXT}")
    elif isinstance(model, (str, Path)) and Path(str(model)).suffix == ".pt":
        net, _ = load_checkpoint(model)
    else:
        d = _yaml_dict(model)
        _check_yaml(d)
        if act is not None:
            d["activation"] = ACTIVATIONS[act]
        d.pop("casc", None)
        net = ultralytics_api().DetectionModel(d, ch=int(d.get("channels", 3)), nc=nc, verbose=verbose)
    check_supported(net)
    net.float()
    quantized = any(isinstance(m, ClipQuan) for m in net.modules())
    if act is not None and not quantized and model_act(net) != act:
        _set_activation(net, act)
    act = act or model_act(net)
    if quantize:
        return quantize_model(net, levels, act, learnable)
    if quantized:
        raise ValueError("quantize=False but the model is already a QANN")
    net.yaml["casc"] = {"levels": None, "act": act, "quantized": False}
    return net


# --- checkpoints ------------------------------------------------------------------------------------------

def _plain(value):
    """Metadata as plain Python (dict/list/str/int/float/bool/None) for weights_only loading."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _names_dict(names) -> dict[int, str]:
    if names is None:
        return {}
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    return {i: str(n) for i, n in enumerate(names)}


def _imgsz_of(value, default: int = 640) -> int:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(max(value))
    return int(value)


def _load_ultralytics(path: Path) -> tuple[DetectionModel, dict]:
    """An Ultralytics ``.pt``, unpickled with ``weights_only=True`` under the allowlist of ``pt_files`` (no code
    runs; a file naming anything else is refused), then set up as Ultralytics' own loader does."""
    ckpt = load_ultralytics_file(path)
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: an Ultralytics checkpoint holds its model under 'ema' or 'model'; this one "
                              "has neither")
    if hasattr(model, "fuse") and getattr(model, "is_fused", lambda: False)():
        raise UnsupportedModelError(f"{path}: the checkpoint holds a fused model (BatchNorm removed); "
                                    "use the training checkpoint")
    args = ckpt.get("train_args") or {}
    model.args = {**ultralytics_api().DEFAULT_CFG_DICT, **args}
    model.pt_path = str(path)
    for m in model.modules():  # as Ultralytics' loader leaves them
        if hasattr(m, "inplace"):
            m.inplace = True
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    model = model.float().eval()
    meta = {"names": _names_dict(getattr(model, "names", None)), "imgsz": _imgsz_of(args.get("imgsz")),
            "format": "ultralytics"}
    return model, meta


def load_checkpoint(path: str | Path, sha256: str | None = None, levels: int | None = None,
                    act: str | None = None) -> tuple[DetectionModel, dict]:
    """(model, metadata) from this project's safe format or an Ultralytics ``.pt``.

    ``sha256``: expected hex digest, checked before anything is loaded (a mismatch raises ``ValueError``).
    Both load with ``torch.load(weights_only=True)``: an Ultralytics ``.pt`` (a pickle of the model) under the
    allowlist of ``pt_files``, so no code from a file ever runs. The model is returned as stored (a QANN
    if it was trained as one, else float); ``levels``/``act`` are only used by ``build_qann``.
    Metadata: ``names`` (dict), ``imgsz``, ``levels``, ``act``, ``format``.
    """
    path = Path(path)
    try:
        ckpt = checkpoint.load(path, sha256)  # a modified file of ours is refused here
    except UnreadableCheckpoint as error:
        if "PytorchStreamReader" in str(error) or "zip archive" in str(error):
            raise
        ckpt = None  # a pickle: Ultralytics' own format
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        model = _from_safe(ckpt)
        meta = {"names": _names_dict(ckpt.get("names")), "imgsz": _imgsz_of(ckpt.get("imgsz")),
                "format": CHECKPOINT_FORMAT}
    elif path.suffix == ".pt":
        model, meta = _load_ultralytics(path)
    else:
        raise ValueError(f"{path}: neither a {CHECKPOINT_FORMAT} checkpoint nor an Ultralytics .pt")
    check_supported(model)
    info = _casc_meta(model)
    quantized = any(isinstance(m, ClipQuan) for m in model.modules())
    meta.update(levels=qann_levels(model) if quantized else None, act=info.get("act") or model_act(model),
                quantized=quantized)
    return model, meta


def ultralytics_start_checkpoint(model: DetectionModel, path: str | Path) -> Path:
    """``model`` as start weights for Ultralytics' trainer, which reads only its own format and unpickles it without
    an allowlist: it is handed only files written here, of models that ``load_checkpoint`` read safely. Float32:
    half precision would move calibrated thresholds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": copy.deepcopy(model).float(), "train_args": {}, "epoch": -1}, path)
    return path


def _from_safe(ckpt: dict) -> DetectionModel:
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint format version {ckpt.get('version')} is newer than this library's "
                         f"({CHECKPOINT_VERSION}); update casc-detector")
    d = copy.deepcopy(ckpt["yaml"])
    _check_yaml(d)
    d.pop("casc", None)
    model = ultralytics_api().DetectionModel(d, ch=int(d.get("channels", 3)), nc=int(d["nc"]), verbose=False)
    state = ckpt["state_dict"]
    if ckpt.get("levels"):
        to_qann(model, int(ckpt["levels"]), learnable=bool(ckpt.get("learnable")), inplace=True)
        state = with_legacy_quant_state(model, state)
    model.yaml["casc"] = {"levels": ckpt.get("levels"), "act": ckpt.get("act"), "quantized": bool(ckpt.get("levels"))}
    model.load_state_dict(state, strict=True)
    model.names = _names_dict(ckpt.get("names")) or model.names
    return model.float().eval()


def export_checkpoint(model_or_pt: nn.Module | str | Path | SpikingDetector, path: str | Path,
                      names: dict | Sequence[str] | None = None, imgsz: int | None = None) -> Path:
    """Write ``model_or_pt`` (a QANN / float DetectionModel, a ``SpikingYOLO``, or a checkpoint path) in this
    project's safe format: ``{"format", "version", "state_dict", "yaml", "levels", "learnable", "act",
    "names", "imgsz"}``, loadable with ``torch.load(path, weights_only=True)``. Returns ``path``."""
    meta: dict = {}
    if isinstance(model_or_pt, SpikingDetector):
        meta = {"names": model_or_pt.names, "imgsz": getattr(model_or_pt, "imgsz", None)}
        model = model_or_pt.qann
    elif isinstance(model_or_pt, (str, Path)):
        model, meta = load_checkpoint(model_or_pt)
    else:
        model = model_or_pt
    check_supported(model)
    quant = [m for m in model.modules() if isinstance(m, ClipQuan)]
    levels = qann_levels(model)
    yaml = {k: v for k, v in model.yaml.items() if k != "casc"}
    names = _names_dict(names if names is not None else (meta.get("names") or getattr(model, "names", None)))
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                       for k, v in model.state_dict().items()},
        "yaml": _plain(yaml),
        "levels": levels,
        "learnable": any(q.learnable for q in quant),
        "act": _casc_meta(model).get("act") or model_act(model),
        "names": [names[i] for i in sorted(names)] if names else None,
        "imgsz": int(imgsz if imgsz is not None else meta.get("imgsz") or 640),
    }
    return checkpoint.save(ckpt, path)


def save_qann(qann: DetectionModel, path: str | Path, names, imgsz: int, act: str) -> Path:
    """Write a quantized ``DetectionModel`` (e.g. from ``detector.calibrate.quantize``) in our safe format."""
    qann.yaml["casc"] = {"levels": qann_levels(qann), "act": act, "quantized": True}
    return export_checkpoint(qann, path, names=names, imgsz=imgsz)

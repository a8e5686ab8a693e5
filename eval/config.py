"""What one evaluation is asked to do: ``EvalConfig``, the methods it can compare, and the T list's parsing.

``casc eval``'s options (``eval/cli.py``) become an ``EvalConfig``; ``eval.evaluate`` takes one from Python too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detector.families import get_family
from detector.options import Schedule, Selection
from detector.video import KEYFRAME_EVERY

# method -> the neuron kind its spiking network converts to (detector.neuron_kinds); ann and qann are forward passes
METHOD_NEURONS = {"casc": "cif", "casc-paper": "cif", "qcfs": "qcfs", "if": "if"}
METHODS = ("ann", "qann", *METHOD_NEURONS)
SPIKING = tuple(METHOD_NEURONS)
DEFAULT_METHODS = ("ann", "qann", "casc", "if")  # casc-paper and qcfs on request (QCFS runs as many steps as IF)
# The reference implementation's schedule (Li et al., arXiv 2406.05371): one spike per neuron per sleep step and a
# fixed sleep window of L..L+4 steps, so T = 2L .. 2L + 4; casc-paper runs to the window's end.
PAPER_SLEEP_EXTRA = 4


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation; the fields are ``casc eval``'s options (``casc eval --help`` says what each does)."""

    model: str | Path  # the QANN: a bundled name (weights/manifest.json) or a checkpoint path
    float_model: str | Path | None = None  # the float model for ANN and IF (None: the manifest's)
    data: str = "bundled"
    split: str = "val"
    methods: tuple[str, ...] = DEFAULT_METHODS
    timesteps: tuple[int, ...] | None = None  # total steps T (None: the family's default list)
    wake: int | None = Schedule.wake  # None: the QANN's levels L
    sleep: int | str = Schedule.sleep
    burst: int | None = Schedule.burst
    max_sleep: int = Schedule.max_sleep
    limit: int | None = None
    batch: int = 1
    conf: float = 0.001  # low, for mAP (Selection's default keeps only confident detections)
    iou: float = Selection.iou
    max_det: int = Selection.max_det
    calibration_images: int = 32
    device: str = "cpu"
    engine: str = "pytorch"
    provider: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    names: str | None = None  # class names of a VOC dataset, comma-separated or a file (None: the model's)
    metric: str = "map50_95"
    out: str | Path | None = None  # the output folder itself (None: PROJECT/NAME, see run_folder)
    project: str = "runs/eval"
    name: str | None = None
    exist_ok: bool = False
    video: bool | None = None  # None: on for bundled-video
    keyframe_every: int = KEYFRAME_EVERY

    def __post_init__(self) -> None:
        check_methods(self.methods)
        if self.sleep != "auto" and (isinstance(self.sleep, bool) or not isinstance(self.sleep, int)):
            raise ValueError(f'sleep must be a number of steps or "auto", got {self.sleep!r}')


def parse_timesteps(spec: str) -> list[int]:
    """``"1-16,24,32"`` -> ``[1, ..., 16, 24, 32]``."""
    steps: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                steps.update(range(lo, hi + 1))
            elif part:
                steps.add(int(part))
    except ValueError:
        raise ValueError(f"--timesteps: expected e.g. 1-16,24,32, got {spec!r}") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--timesteps must list positive integers, got {spec!r}")
    return sorted(steps)


def parse_methods(spec: str) -> tuple[str, ...]:
    """``"qann,casc"`` -> ``("qann", "casc")``, each a known method."""
    return check_methods(tuple(m.strip() for m in spec.split(",") if m.strip()))


def check_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return methods


def stage_budgets(family: str, timesteps: list[int]) -> dict[int, int]:
    """Total T -> the step budget ``detections_at_steps`` takes per stage (T split evenly over the family's spiking
    stages: T itself for YOLO, T/2 for Faster R-CNN)."""
    fam = get_family(family)
    try:
        return {t: fam.steps_per_stage(t) for t in timesteps}
    except ValueError as error:
        raise ValueError(f"--timesteps: {error}") from None

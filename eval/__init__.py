"""Evaluation of spiking detectors: mAP against time steps on COCO, VOC and the bundled set.

    from eval import EvalConfig, evaluate
    report = evaluate(EvalConfig(model="yolov8n-bundled", limit=16, out="runs/eval/quick"))
    report.summary["casc"]["metrics"]["auto"]["map50_95"]

``evaluate`` (``eval/run.py``) takes a typed ``EvalConfig`` (``eval/config.py``) and returns an ``EvalReport``;
the command line (``eval/cli.py``) and the report files and text (``eval/report.py``) sit apart from it.
"""

from .config import EvalConfig, parse_timesteps
from .report import report_text
from .run import EvalReport, evaluate

__all__ = ["EvalConfig", "EvalReport", "evaluate", "parse_timesteps", "report_text"]

"""Evaluation of spiking detectors: mAP against time steps on COCO, VOC and the bundled set.

    from eval import EvalConfig, evaluate
    report = evaluate(EvalConfig(model="yolov8n-bundled", limit=16, out="runs/eval/quick"))
    report.summary["casc"]["metrics"]["auto"]["map50_95"]

``evaluate`` (``eval/run.py``) takes a typed ``EvalConfig`` (``eval/config.py``) and returns an ``EvalReport``;
the command line (``eval/cli.py``) and the report files (``eval/report.py``) sit apart from it. The names import
on first use, so ``import eval.metrics`` stays light.
"""

from importlib import import_module

# public name -> the module that defines it
_EXPORTS = {"EvalConfig": "config", "evaluate": "run", "EvalReport": "run", "report_text": "report",
            "parse_timesteps": "config"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eval' has no attribute {name!r}")

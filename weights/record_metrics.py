"""Fill the manifest's ``metrics`` from ``casc eval`` results, with the command that measured them.

    casc eval --model yolov8n-bundled --methods ann,qann,casc --timesteps 1-8 --out runs/metrics/yolov8n-bundled
    python weights/record_metrics.py runs/metrics/yolov8n-bundled/results.json [more results.json ...]

For each results file: the QANN entry gets its QANN mAP and the CASC SNN's (at ``sleep="auto"``, with the
mean total steps, steps to 99 % of the QANN and to 95 % of the float model); the float entry gets the ANN
mAP. Figures of a method that was not evaluated are left as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "manifest.json"


def _map(metrics: dict) -> dict:
    return {"map50_95": round(metrics["map50_95"], 4), "map50": round(metrics["map50"], 4)}


def metrics_from(results: dict) -> dict[str, dict]:
    """{manifest name: metrics} measured by one ``casc eval`` run."""
    summary, data = results["summary"], results["data"]
    where = {"data": data["spec"], "split": data["split"], "images": data["images"], "command": results["command"]}
    found: dict[str, dict] = {}
    if "qann" in summary:
        qann = {**where, "qann": _map(summary["qann"]["metrics"]["flat"])}
        casc = summary.get("casc")
        if casc and "auto" in casc["metrics"]:
            auto = casc["metrics"]["auto"]
            qann["casc_auto"] = {**_map(auto), "steps_mean": round(auto["steps_mean"], 2),
                                 "schedule": results["schedule"]}
            qann["casc_steps_to_99pct_qann"] = casc.get("steps_to_99pct_qann")
            if "ann" in summary:
                target = 0.95 * summary["ann"]["metrics"]["flat"]["map50_95"]
                steps = sorted(int(t) for t in casc["metrics"] if t != "auto")
                qann["casc_steps_to_95pct_float"] = next(
                    (t for t in steps if casc["metrics"][str(t)]["map50_95"] >= target), None)
        found[results["model"]["name"]] = qann
    if "ann" in summary and results.get("float_model"):
        found[results["float_model"]["name"]] = {**where, "ann": _map(summary["ann"]["metrics"]["flat"])}
    return found


def record(paths: list[Path], manifest: Path = MANIFEST) -> dict:
    data = json.loads(manifest.read_text())
    by_name = {entry["name"]: entry for entry in data["models"]}
    for path in paths:
        for name, metrics in metrics_from(json.loads(Path(path).read_text())).items():
            if name not in by_name:
                raise ValueError(f"{path}: model {name!r} is not in {manifest}")
            by_name[name]["metrics"] = {**by_name[name].get("metrics", {}), **metrics}
    manifest.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files written by casc eval")
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args()
    record(args.results, args.manifest)
    print(f"updated {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``casc plot DIR [DIR ...]``: several evaluations (``results.json`` of ``casc eval``) on one axis each:
mAP against total time steps, against energy per image and against latency. Both detector families
share the axes, since every run reports total steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .plots import METRIC_NAMES, plot_map_vs_energy, plot_map_vs_latency, plot_map_vs_t

PLOTS = {"map_vs_t.png": plot_map_vs_t, "map_vs_energy.png": plot_map_vs_energy,
         "map_vs_latency.png": plot_map_vs_latency}


def load_results(path: str | Path) -> dict:
    """A run folder's results.json (or the file itself)."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run casc eval --out {path.parent} first)")
    return json.loads(path.read_text())


def plot_runs(runs: list[dict], out: Path, metric: str = "map50_95") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in PLOTS.items():
        draw(runs, out / name, metric)
    return [out / name for name in PLOTS]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="casc eval output folders (or their results.json)")
    parser.add_argument("--out", default="runs/plot", help="folder for the combined plots")
    parser.add_argument("--metric", default="map50_95", choices=list(METRIC_NAMES),
                        help="the y axis: COCO mAP50-95 or mAP50, VOC07 11-point or all-point AP50")


def main(args: argparse.Namespace) -> int:
    runs = [load_results(r) for r in args.runs]
    for path in plot_runs(runs, Path(args.out), args.metric):
        print(path)
    return 0

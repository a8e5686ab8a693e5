"""Pictures of an evaluation: mAP against total time steps, firing rates per layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"casc": ("tab:red", "o"), "if": ("tab:blue", "s")}
LINES = {"ann": ("black", "-"), "qann": ("tab:green", "--")}


def plot_map_vs_t(curves: dict[str, dict[int, float]], flat: dict[str, float], wake: int, path: Path,
                  metric: str = "mAP50-95", title: str = "",
                  xlabel: str = "total time steps T = wake + sleep") -> Path:
    """One curve per spiking method (total steps T on a log axis), the ANN and QANN as lines."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, curve in curves.items():
        ts = sorted(curve)
        color, marker = STYLE.get(method, (None, "^"))
        ax.plot(ts, [curve[t] for t in ts], marker=marker, ms=4, color=color, label=method.upper() + " SNN")
    for method, value in flat.items():
        color, style = LINES.get(method, ("gray", ":"))
        ax.axhline(value, color=color, linestyle=style, lw=1.2, label=f"{method.upper()} ({value:.3f})")
    ax.axvline(wake, color="gray", lw=0.8, linestyle=":")
    ax.text(wake, ax.get_ylim()[0], f" wake={wake} | sleep", color="gray", fontsize=8, va="bottom")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs time steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_firing_rates(rates: dict[str, float], path: Path, title: str = "CASC firing rate per layer") -> Path:
    """Spikes per neuron per step for every neuron call site, in network order."""
    names = list(rates)
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names) + 2), 4), dpi=120)
    ax.bar(range(len(names)), [rates[n] for n in names], color="tab:red")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=5 if len(names) > 40 else 7)
    ax.set_ylabel("spikes per neuron per step")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

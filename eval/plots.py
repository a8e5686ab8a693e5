"""Pictures of evaluations: mAP against total time steps, energy per image and latency, firing rates per layer.

Every function takes ``results.json`` dicts (one run or several, e.g. both detector families) and draws
only measured points: markers, no lines between them (a line would claim values nobody measured).
The float ANN and the QANN do not depend on T, so on the time-step axis they are horizontal lines.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from detector.families import get_family  # noqa: E402

# drawn in this order: CASC's points over casc-paper's larger diamonds where the two coincide (the wake steps)
SPIKING_STYLE = {"casc-paper": ("tab:purple", "D"), "casc": ("tab:red", "o"), "qcfs": ("tab:cyan", "X"),
                 "if": ("tab:blue", "s")}
FLAT_STYLE = {"ann": ("black", "-", "D"), "qann": ("tab:green", "--", "P")}
# several runs on one axis: the same colour per method, lighter and another marker shape per run
RUN_SHADES = (1.0, 0.6, 0.35)
RUN_MARKERS = {"casc": ("o", "^", "p"), "casc-paper": ("D", "d", "8"), "qcfs": ("X", "x", "+"),
               "if": ("s", "v", "h")}
METRIC_NAMES = {"map50_95": "mAP50-95", "map50": "mAP50", "voc07_map50": "VOC07 mAP50 (11-point)",
                "voc_map50": "VOC mAP50 (all-point)"}
DPI = 110


# --- what a results.json says ---------------------------------------------------------------------------

def schedule_text(results: dict) -> str:
    """``L=4, wake=4, sleep=auto, burst γ=4`` (γ = the wake count when the run left it unset)."""
    s = results["schedule"]
    levels = results["model"].get("levels") or s.get("wake")
    burst = s.get("burst") or s.get("wake")
    return f"L={levels}, wake={s.get('wake')}, sleep={s.get('sleep')}, burst γ={burst}"


def run_title(results: dict) -> str:
    data = results["data"]
    return f"{results['model']['name']} on {data['name']} ({data['images']} images); {schedule_text(results)}"


def figure_title(runs: list[dict], what: str, machine: bool = False) -> str:
    return what + "\n" + "\n".join(run_title(r) + (f"; {machine_text(r)}" if machine else "") for r in runs)


def machine_text(results: dict) -> str:
    m = results.get("machine", {})
    threads = m.get("threads", "?")
    return f"{m.get('device', '?')}, {threads} thread{'' if threads == 1 else 's'}" + (
        f" of {m['cores']} cores" if m.get("cores") else "")


def spiking_points(results: dict, method: str, metric: str) -> list[dict]:
    """One dict per evaluated T: ``T``, ``map``, ``energy_uj``, ``latency_ms`` (None where not measured)."""
    entry = results["summary"][method]
    return [{"T": int(t), "map": entry["metrics"][str(t)][metric],
             "energy_uj": entry.get("energy_uj_at", {}).get(str(t)),
             "integer_energy_uj": entry.get("integer_energy_uj_at", {}).get(str(t)),
             "latency_ms": entry.get("latency_ms_at", {}).get(str(t))}
            for t in results["schedule"]["timesteps"]]


def auto_point(results: dict, metric: str) -> dict | None:
    """CASC's sleep-until-quiet answer: its mAP at its mean total steps (None without ``sleep=auto``)."""
    casc = results["summary"].get("casc", {})
    auto = casc.get("metrics", {}).get("auto")
    if auto is None:
        return None
    return {"T": auto["steps_mean"], "map": auto[metric], "energy_uj": casc.get("energy_uj_at", {}).get("auto"),
            "integer_energy_uj": casc.get("integer_energy_uj_at", {}).get("auto"),
            "latency_ms": casc.get("latency_ms_at", {}).get("auto")}


def flat_points(results: dict, metric: str) -> dict[str, dict]:
    """The ANN and QANN: their mAP, one forward's MAC energy (the same network shape) and measured latency."""
    summary = results["summary"]
    energy = next((summary[m]["ann_energy_uj"] for m in SPIKING_STYLE if summary.get(m, {}).get("ann_energy_uj")),
                  None)
    return {m: {"map": summary[m]["metrics"]["flat"][metric], "energy_uj": energy,
                "latency_ms": summary[m].get("latency_ms")}
            for m in ("ann", "qann") if m in summary}


def _label(results: dict, method: str, several: bool) -> str:
    name = {"casc": "CASC SNN", "casc-paper": "CASC, paper's schedule (γ=1)", "qcfs": "QCFS SNN", "if": "IF SNN",
            "ann": "ANN", "qann": "QANN"}[method]
    return f"{results['model']['name']}: {name}" if several else name


def _marker(method: str, run: int) -> str:
    shapes = RUN_MARKERS[method]
    return shapes[run % len(shapes)]


def _shade(color: str, run: int):
    rgb = matplotlib.colors.to_rgb(color)
    k = RUN_SHADES[run % len(RUN_SHADES)]
    return tuple(1 - k * (1 - c) for c in rgb)


# --- the plots -------------------------------------------------------------------------------------------

def plot_map_vs_t(runs: list[dict], path: Path, metric: str = "map50_95") -> plt.Figure:
    """mAP against total time steps T (log axis, a tick at every evaluated T); CASC's auto point as a star."""
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=DPI)
    several = len(runs) > 1
    evaluated: set[int] = set()
    for k, results in enumerate(runs):
        for method in SPIKING_STYLE:
            if method not in results["summary"]:
                continue
            points = spiking_points(results, method, metric)
            evaluated.update(p["T"] for p in points)
            color, marker = SPIKING_STYLE[method][0], _marker(method, k)
            ax.plot([p["T"] for p in points], [p["map"] for p in points], linestyle="none", marker=marker, ms=7,
                    color=_shade(color, k), label=_label(results, method, several))
        auto = auto_point(results, metric)
        if auto is not None:
            ax.plot(auto["T"], auto["map"], linestyle="none", marker="*", ms=16, color=_shade("tab:orange", k),
                    markeredgecolor="black", label=f"{_label(results, 'casc', several)}, sleep=auto "
                                                   f"(mean T={auto['T']:.1f})")
            # below the star for the first run, above it for the next: two runs' stars often nearly coincide
            ax.annotate(f"auto\nT={auto['T']:.1f}", (auto["T"], auto["map"]), textcoords="offset points",
                        xytext=(8, -22) if k % 2 == 0 else (8, 8), fontsize=9)
        for method, point in flat_points(results, metric).items():
            color, style, _ = FLAT_STYLE[method]
            ax.axhline(point["map"], color=_shade(color, k), linestyle=style, lw=1.3,
                       label=f"{_label(results, method, several)} ({point['map']:.3f}, no time steps)")
    ax.set_xscale("log", base=2)
    ticks = sorted(evaluated)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(t) for t in ticks]))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.tick_params(axis="x", labelsize=9 if len(ticks) <= 12 else 7)
    two_stage = any(len(get_family(r["model"]["family"]).stages) > 1 for r in runs)
    ax.set_xlabel("total time steps T = wake + sleep" + (" (Faster R-CNN: both stages, T/2 each)" if two_stage else ""))
    _finish(fig, ax, runs, metric, f"{METRIC_NAMES[metric]} vs time steps", path)
    return fig


def plot_map_vs_energy(runs: list[dict], path: Path, metric: str = "map50_95") -> plt.Figure:
    """mAP against estimated energy per image (µJ, log): one point per T for CASC and IF, one for the ANN."""
    return _map_vs_cost(runs, path, metric, "energy_uj", "estimated energy per image (µJ, log scale; "
                                                          "SNN: 0.9 pJ per synaptic op, ANN: 4.6 pJ per MAC)",
                        f"{METRIC_NAMES[metric]} vs energy per image")


def plot_energy_vs_qann(runs: list[dict], path: Path, metric: str = "map50_95") -> plt.Figure:
    """mAP against compute energy per image on integer hardware (µJ, log): one point per T for every spiking
    method and the QANN's own point (int8 weights, L-level activations), the comparison the spiking network has
    to win (``detector.energy.integer_energy``)."""
    fig = _map_vs_cost(runs, path, metric, "integer_energy_uj",
                       "compute energy per image on integer hardware (µJ, log scale; Horowitz 45 nm: SNN 0.1 pJ "
                       "per single-spike synaptic op, QANN an L-level x int8 MAC)",
                       f"{METRIC_NAMES[metric]} vs energy against the QANN", qann_point=True)
    return fig


def qann_integer_point(results: dict, metric: str) -> dict | None:
    """The QANN on integer hardware: its mAP and MAC energy (from a spiking method's comparison block)."""
    summary = results["summary"]
    energy = next((summary[m]["qann_integer_energy_uj"] for m in SPIKING_STYLE
                   if summary.get(m, {}).get("qann_integer_energy_uj")), None)
    if energy is None or "qann" not in summary:
        return None
    return {"map": summary["qann"]["metrics"]["flat"][metric], "integer_energy_uj": energy}


def plot_map_vs_latency(runs: list[dict], path: Path, metric: str = "map50_95") -> plt.Figure:
    """mAP against measured milliseconds per image on the machine that ran the evaluation."""
    return _map_vs_cost(runs, path, metric, "latency_ms", "latency per image (ms, log scale; measured run time, "
                                                          "SNN: shared out per simulated step)",
                        f"{METRIC_NAMES[metric]} vs latency on this machine")


def _map_vs_cost(runs, path, metric, cost, xlabel, what, qann_point: bool = False) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=DPI)
    several = len(runs) > 1
    for k, results in enumerate(runs):
        for method in SPIKING_STYLE:
            if method not in results["summary"]:
                continue
            points = [p for p in spiking_points(results, method, metric) if p[cost]]
            color, marker = SPIKING_STYLE[method][0], _marker(method, k)
            ax.plot([p[cost] for p in points], [p["map"] for p in points], linestyle="none", marker=marker, ms=7,
                    color=_shade(color, k), label=_label(results, method, several) + " (one point per T)")
            _label_points(ax, points, cost, method)
        auto = auto_point(results, metric)
        if auto is not None and auto[cost]:
            ax.plot(auto[cost], auto["map"], linestyle="none", marker="*", ms=16, color=_shade("tab:orange", k),
                    markeredgecolor="black", label=f"{_label(results, 'casc', several)}, sleep=auto "
                                                   f"(mean T={auto['T']:.1f})")
        flat = {"qann": qann_integer_point(results, metric)} if qann_point else flat_points(results, metric)
        for method, point in flat.items():
            if point and point.get(cost):
                color, _, marker = FLAT_STYLE[method]
                ax.plot(point[cost], point["map"], linestyle="none", marker=marker, ms=10, color=_shade(color, k),
                        label=f"{_label(results, method, several)} ({point['map']:.3f})")
    _log_ticks(ax)
    ax.set_xlabel(xlabel)
    _finish(fig, ax, runs, metric, what, path, machine=cost == "latency_ms")
    return fig


# labels above CASC's points, below the baselines': fewer collisions
LABEL_OFFSETS = {"casc": (5, 5), "casc-paper": (5, 5), "qcfs": (5, -12), "if": (5, -12)}


def _log_ticks(ax) -> None:
    """A log x axis labelled 1, 2, 5 per decade over a short range, once per decade over a long one (10k, 200k)."""
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    subs = (1, 2, 5) if high / low < 300 else (1,)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _label_points(ax, points: list[dict], cost: str, method: str) -> None:
    """``T=4`` beside each point; points that coincide (settled: nothing changes any more) share one label."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((round(p[cost], 6), round(p["map"], 6)), []).append(p)
    for group in groups.values():
        ts = [p["T"] for p in group]
        text = f"T={ts[0]}" if len(ts) == 1 else f"T={ts[0]}…{ts[-1]}"
        ax.annotate(text, (group[0][cost], group[0]["map"]), textcoords="offset points",
                    xytext=LABEL_OFFSETS.get(method, (5, 5)), fontsize=8, color=SPIKING_STYLE[method][0])


def _finish(fig, ax, runs, metric, what, path, machine: bool = False) -> None:
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_ylim(bottom=0)  # an mAP is never negative (an all-zero run would otherwise centre the axis on 0)
    ax.set_title(figure_title(runs, what, machine), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    # below the axes: a legend inside would hide measured points
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# --- firing rates ------------------------------------------------------------------------------------------

STAGE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def plot_firing_rates(rates: dict[str, float], path: Path, family: str, title: str) -> plt.Figure:
    """Spikes per neuron per step of every neuron call site, as horizontal bars in network order, coloured and
    labelled by stage (YOLO: backbone / neck / head; Faster R-CNN: stage 1 parts / stage 2)."""
    names = list(rates)
    part_of = get_family(family).layer_part
    stages = [part_of(n) for n in names]
    order = list(dict.fromkeys(stages))
    height = 1.6 + 0.2 * len(names)
    fig, ax = plt.subplots(figsize=(8, height), dpi=DPI)
    colors = [STAGE_COLORS[order.index(s) % len(STAGE_COLORS)] for s in stages]
    ax.barh(range(len(names)), [rates[n] or 0.0 for n in names], color=colors, height=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()  # network order, input at the top
    ax.set_ylim(len(names) - 0.5, -0.5)
    handles = []
    for stage, color in zip(order, STAGE_COLORS * 4):
        members = [rates[n] or 0.0 for n, s in zip(names, stages) if s == stage]
        handles.append(matplotlib.patches.Patch(
            color=color, label=f"{stage}: {len(members)} layers, mean {sum(members) / len(members):.3f}"))
    ax.set_xlim(0, 1.6 * max([v or 0.0 for v in rates.values()] + [1e-3]))  # room for the legend, top right
    ax.set_xlabel("spikes per neuron per step (CASC)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(handles=handles, fontsize=9, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig

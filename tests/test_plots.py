"""The evaluation plots, checked on their matplotlib figures (axes, ticks, markers), from hand-made results."""

import json

import matplotlib.lines
import pytest

from casc.cli import main as casc
from eval.compare import load_results, plot_runs
from detector.families import get_family
from eval.plots import (plot_energy_vs_qann, plot_firing_rates, plot_map_vs_energy, plot_map_vs_latency,
                        plot_map_vs_t, schedule_text)


def fake_results(family="yolo", name="yolov8n-bundled", timesteps=(1, 2, 4, 6, 8), settle=6, images=16):
    """A results.json as casc eval writes it: CASC reaches the QANN at ``settle``, IF climbs slowly."""
    def metric(value, steps=None):
        return {"map50_95": value, "map50": min(1.0, value + 0.2), "steps_mean": steps}

    casc = {str(t): metric(0.6 if t >= settle else 0.1 * t / settle, min(t, settle)) for t in timesteps}
    casc["auto"] = metric(0.6, settle + 0.3)
    spiking = {
        "casc": {"metrics": casc, "energy_uj_at": {k: 10.0 * min(int(k) if k != "auto" else settle, settle)
                                                   for k in casc},
                 "latency_ms_at": {k: 5.0 * min(int(k) if k != "auto" else settle, settle) for k in casc},
                 "ann_energy_uj": 100.0, "latency_ms": 30.0,
                 "firing_rates": {"layers.0.act": 0.2, "layers.12.cv1.act": 0.3, "head.cv2.0.0.act": 0.4}},
        "if": {"metrics": {str(t): metric(0.01 * t, t) for t in timesteps},
               "energy_uj_at": {str(t): 8.0 * t for t in timesteps},
               "latency_ms_at": {str(t): 4.0 * t for t in timesteps}, "ann_energy_uj": 100.0, "latency_ms": 32.0},
    }
    return {"model": {"name": name, "family": family, "levels": 4},
            "data": {"name": "bundled/val", "images": images},
            "schedule": {"wake": 4, "sleep": "auto", "burst": 4, "timesteps": list(timesteps)},
            "machine": {"device": "cpu", "threads": 2, "cores": 2},
            "summary": {"ann": {"metrics": {"flat": metric(0.8)}, "latency_ms": 3.0},
                        "qann": {"metrics": {"flat": metric(0.6)}, "latency_ms": 3.5}, **spiking}}


from test_eval import assert_drawn  # noqa: E402


def markers(ax) -> dict[str, matplotlib.lines.Line2D]:
    return {line.get_label(): line for line in ax.get_lines() if line.get_marker() not in (None, "None", "")}


def test_map_vs_t_markers_only_a_tick_per_t_auto_and_schedule_in_title(tmp_path):
    fig = plot_map_vs_t([fake_results()], tmp_path / "t.png")
    ax = fig.axes[0]
    assert_drawn(tmp_path / "t.png")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "6", "8"]
    points = markers(ax)
    for label in ("CASC SNN", "IF SNN"):
        assert points[label].get_linestyle() == "None" and len(points[label].get_xdata()) == 5
    auto = next(line for label, line in points.items() if "auto" in label)
    assert list(auto.get_xdata()) == [pytest.approx(6.3)] and "mean T=6.3" in auto.get_label()
    title = ax.get_title()
    assert all(s in title for s in ("16 images", "bundled/val", "L=4", "wake=4", "sleep=auto", "burst γ=4"))
    assert "total time steps" in ax.get_xlabel()


def test_energy_and_latency_one_point_per_t_with_the_ann(tmp_path):
    results = fake_results()
    for draw, key in ((plot_map_vs_energy, "energy"), (plot_map_vs_latency, "latency")):
        ax = draw([results], tmp_path / f"{key}.png").axes[0]
        points = markers(ax)
        casc = points["CASC SNN (one point per T)"]
        assert casc.get_linestyle() == "None" and len(casc.get_xdata()) == 5
        assert len(points["IF SNN (one point per T)"].get_xdata()) == 5
        assert any(label.startswith("ANN") for label in points) and ax.get_xscale() == "log"
        assert key in ax.get_xlabel()
        texts = {t.get_text() for t in ax.texts}
        assert "T=1" in texts and "T=6…8" in texts  # settled points share one label
    assert "cpu, 2 threads" in ax.get_title()  # latency: the machine that measured it


def test_two_families_share_the_total_step_axis(tmp_path):
    yolo, rcnn = fake_results(), fake_results("rcnn", "rcnn-r18-bundled", timesteps=(2, 4, 8, 12), settle=12)
    ax = plot_map_vs_t([yolo, rcnn], tmp_path / "both.png").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "6", "8", "12"]
    labels = set(markers(ax))
    assert {"yolov8n-bundled: CASC SNN", "rcnn-r18-bundled: CASC SNN"} <= labels
    assert "rcnn-r18-bundled on bundled/val" in ax.get_title() and "both stages" in ax.get_xlabel()


def test_firing_rates_are_horizontal_bars_grouped_by_stage(tmp_path):
    rates = {f"layers.{i}.act": 0.1 + 0.01 * i for i in range(23)} | {"head.cv2.0.0.act": 0.5}
    ax = plot_firing_rates(rates, tmp_path / "rates.png", "yolo", "rates").axes[0]
    bars = ax.patches
    assert len(bars) == 24 and all(b.get_height() < 1 for b in bars)  # horizontal: thin in y, long in x
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["layers.0.act", "layers.1.act"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.split(":")[0] for t in legend] == ["backbone", "neck", "head"]
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 8


def test_each_family_names_the_part_of_its_network():
    yolo, rcnn = get_family("yolo").layer_part, get_family("rcnn").layer_part
    assert yolo("layers.9.cv2.act") == "backbone"
    assert yolo("layers.10.cv1.act") == "neck"
    assert yolo("head.cv3.2.1.act") == yolo("model.22.cv2.0.0.act") == "head"
    assert rcnn("backbone.body.layer1.0.relu") == "stage 1: backbone"
    assert rcnn("backbone.fpn.inner.0") == "stage 1: FPN"
    assert rcnn("rpn_head.conv.0.1#2") == "stage 1: RPN"
    assert rcnn("roi_heads.box_head.relu6") == "stage 2: box head"


def test_schedule_text_defaults_burst_to_the_wake_count():
    results = fake_results()
    results["schedule"]["burst"] = None
    assert schedule_text(results) == "L=4, wake=4, sleep=auto, burst γ=4"


def test_casc_plot_draws_two_runs_on_one_axis(tmp_path, capsys):
    for name, results in (("a", fake_results()), ("b", fake_results("rcnn", "rcnn-r18-bundled", (2, 4, 8), 8))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    assert casc(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["map_vs_energy.png", "map_vs_latency.png", "map_vs_t.png"]
    for p in written:
        assert_drawn(tmp_path / "out" / p.rsplit("/", 1)[1])
    assert load_results(tmp_path / "a" / "results.json")["model"]["name"] == "yolov8n-bundled"
    assert len(plot_runs([load_results(tmp_path / "a")], tmp_path / "one")) == 3
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path / "missing")


def test_energy_vs_qann_has_every_spiking_method_per_t_and_the_qann_point(tmp_path):
    results = fake_results()
    summary = results["summary"]
    for method, scale in (("casc", 1.0), ("if", 3.0)):
        summary[method]["integer_energy_uj_at"] = {k: scale * v / 5 for k, v in summary[method]["energy_uj_at"].items()}
        summary[method]["qann_integer_energy_uj"] = 9.0
    summary["qcfs"] = {**summary["if"], "metrics": {str(t): {"map50_95": 0.05 * t, "map50": 0.1 * t, "steps_mean": t}
                                                    for t in results["schedule"]["timesteps"]}}
    ax = plot_energy_vs_qann([results], tmp_path / "int.png").axes[0]
    points = markers(ax)
    qann = next(line for label, line in points.items() if label.startswith("QANN"))
    assert list(qann.get_xdata()) == [9.0] and list(qann.get_ydata()) == [0.6]
    for label in ("CASC SNN (one point per T)", "QCFS SNN (one point per T)", "IF SNN (one point per T)"):
        assert len(points[label].get_xdata()) == 5
    assert "integer hardware" in ax.get_xlabel()
    assert_drawn(tmp_path / "int.png")
    assert len(markers(plot_map_vs_t([results], tmp_path / "t.png").axes[0])["QCFS SNN"].get_xdata()) == 5

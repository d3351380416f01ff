import json
import re
import shutil
import subprocess

import pytest

from torchslim.app import cli
from torchslim.app.report import write_report
from torchslim.app.report.figures import layer_series, pareto, points

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _row(stage, metric, kb, ms, info=None):
    return {"stage": stage, "metric_name": "accuracy", "metric": metric, "params": 100, "nonzeros": 50,
            "bytes": int(kb * 1024), "macs_per_sample": 1000.0, "batch_size": 256, "threads": 2,
            "latency": {"eager": {"median_ms": ms}}, "info": info or {}}


RUN = {
    "name": "report-test", "seed": 0, "seconds": 1.0, "versions": {"torch": "2.13.0"},
    "machine": {"cpu": "Test CPU 9000", "isa": "AVX2 (no VNNI)", "threads": 2}, "recipe": {"task": "digits"},
    "rows": [
        _row("baseline", 0.97, 200, 1.0),
        _row("prune", 0.965, 40, 0.9, {"layers": [{"layer": "net.1", "sparsity": 0.9}, {"layer": "net.3", "sparsity": 0.95}],
                                      "sensitivity": [{"layer": "net.1", "sparsity": s, "metric": 0.97 - s / 10} for s in (0.5, 0.9)]}),
        _row("share", 0.96, 5, 0.9, {"layers": {"net.1": {"bits": 4}, "net.3": {"bits": 3}}}),
        _row("bad", 0.90, 60, 2.0),
    ],
}
RUN["rows"][1].update(speedup={"eager": 1.11}, speedup_basis="median", runtime_labels={"eager": "PyTorch eager"})
RUN["rows"][3].update(speedup={"eager": 0.52}, speedup_basis="p10", runtime_labels={"eager": "ONNX Runtime"},
                      warnings=["contended: the timing thread ran 40% of the wall time"])


def test_pareto_front_is_the_non_dominated_points():
    pts = points(RUN)
    assert [p["name"] for p in pareto(pts, "kb")] == ["share", "prune", "baseline"]
    assert [p["name"] for p in pareto(pts, "ms")] == ["prune", "baseline"]
    series = layer_series(RUN)
    assert series[0]["layers"] == ["net.1", "net.3"] and series[0]["values"] == [0.9, 0.95]
    assert series[0]["technique"] == "prune"
    # share's {layer: {bits}} form without cluster counts is read by the generic reader
    assert series[1]["key"] == "bits" and series[1]["values"] == [4.0, 3.0]


@pytest.fixture()
def report(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(RUN))
    return write_report(tmp_path / "run.json")


def test_report_is_self_contained_and_states_the_machine(report):
    html = report.read_text()
    assert "Test CPU 9000 (AVX2 (no VNNI)) with 2 torch threads" in html  # CPU, ISA, threads
    # the interleaved speedup of the row itself, not a ratio to a baseline timed elsewhere;
    # a contended row is marked and its warning listed; each row names its runtime
    assert "<td>1.11×</td>" in html and "<td>0.52×* ⚠</td>" in html and "<td>~0.90" not in html
    assert "ran 40% of the wall time" in html and "<td>ONNX Runtime</td>" in html
    assert "<script" not in html and "<link" not in html  # static SVG: nothing to fetch or run
    # deltas as a reader wants them: points for accuracy, percent for bytes, × for ratios
    assert "<td>−0.5 pt</td>" in html and "<td>−7.0 pt</td>" in html  # 0.965 - 0.97, 0.90 - 0.97
    assert "<td>−80 % bytes</td>" in html and "<td>5.00×</td>" in html  # 40 KB vs 200 KB
    assert "<td>0.9650</td>" in html and "e-05" not in html
    # the Pareto panels, sparsity and bit-width bars, sensitivity
    assert re.findall(r"data-plot='([^']+)'", html) == ["pareto", "layers-prune-prune", "layers-share-bits",
                                                         "sensitivity"]
    assert html.count("<svg") == 4 and len(html) < 200_000
    assert (report.parent / "pareto.png").stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (the CI script installs it)")
def test_report_renders_in_headless_chromium_without_console_errors(report, tmp_path):
    url = report.resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console_lines = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not [ln for ln in console_lines if "rror" in ln or "Uncaught" in ln], console_lines
    assert dom.stdout.count("<svg") == 4 and dom.stdout.count("<text") > 40, "the SVG figures are not in the page"
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=5000", "--window-size=1200,1600",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1600)
    assert len(set(img.get_flattened_data())) > 20  # a real page, not a blank screen


def test_report_command_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "x.json").write_text("{}")
    assert cli.main(["report", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("torchslim: error: report:") for e in err)


def test_deltas_read_as_points_percent_and_ratios():
    from torchslim.app.report import fmt

    assert fmt.metric_delta(0.961 - 0.965, True) == "−0.4 pt" and fmt.metric_delta(0.0001, True) == "±0.0 pt"
    assert fmt.metric_delta(-0.0123, False) == "−0.0123"  # a metric that is not a share stays as it is
    assert fmt.percent_change(38, 100, "bytes") == "−62 % bytes" and fmt.ratio(1.8) == "1.80×"
    assert fmt.ratio(38.4) == "38.4×" and fmt.size(2048) == "2 KB" and fmt.count(22_565_376) == "22.6M"


def test_axes_are_padded_and_a_flat_accuracy_axis_is_not_0_to_2():
    from torchslim.app.report import charts, fmt

    lo, hi = fmt.padded_range([1.0, 1.0, 1.0], fraction=True)
    assert 0.99 <= lo < 1.0 < hi <= 1.01
    lo, hi = fmt.padded_range([0.90, 0.97], fraction=True)
    assert lo == pytest.approx(0.90 - 0.07 * 0.08) and hi == pytest.approx(0.97 + 0.07 * 0.08)
    pts = [{"name": n, "metric": 1.0, "kb": kb, "ms": ms} for n, kb, ms in (("a", 200, 1.0), ("b", 40, 0.9), ("c", 5, 0.9))]
    fig = charts.pareto_chart(pts, {}, "accuracy", fraction=True)
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert 0.99 <= low < 1.0 < high <= 1.01
    # b and c sit on one another in the latency panel: one label "2,3", not two printed over each other
    labels = sorted(t.get_text() for t in fig.axes[1].texts)
    assert labels == ["1", "2,3"]


def test_long_layer_names_are_shortened_and_stay_distinct():
    from torchslim.app.report.fmt import short_names

    names = [f"bert.encoder.layer.{i}.attention.output.LayerNorm.projection.dense" for i in range(12)]
    short, prefix = short_names(names)
    assert prefix == "bert.encoder.layer." and len(set(short)) == 12 and max(map(len, short)) <= 44
    assert short_names(["net.1", "net.3"]) == (["net.1", "net.3"], "")  # short names stay whole


def test_per_layer_readers_for_transformer_and_mixed_quantization():
    from torchslim.app.report.layers import layer_charts

    blocks = {f"bert.encoder.layer.{i}": {"heads_before": 12, "heads_after": 9 - i % 2, "heads_kept": [],
                                           "ffn_before": 1536, "ffn_after": 1152} for i in range(6)}
    plan = [{"layer": "fc1", "bits": 8, "sensitivity": None}, {"layer": "fc2", "bits": 4, "sensitivity": None}]
    run = {"rows": [{"stage": "baseline", "info": {}},
                    {"stage": "heads", "info": {"params_before": 10, "params_after": 8, "layers": blocks}},
                    {"stage": "q", "info": {"plan": plan, "float_layers": {"emb": "no low-bit kernel"}}}]}
    tr, q = layer_charts(run)
    assert tr.id == "layers-heads-transformer" and tr.labels["heads kept"][:2] == ["9/12", "8/12"]
    assert tr.series["FFN units kept"] == [0.75] * 6 and tr.series["heads kept"][1] == pytest.approx(8 / 12)
    assert q.layers == ["fc1", "fc2", "emb"] and q.series["bits"] == [8.0, 4.0, 32.0]
    assert q.labels["bits"] == ["int8", "int4", "float"] and q.marked == [False, False, True]


def test_figures_past_the_page_budget_point_to_their_png(tmp_path, monkeypatch):
    from torchslim.app.report import html as report_html

    (tmp_path / "run.json").write_text(json.dumps(RUN))
    monkeypatch.setattr(report_html, "FIGURE_BUDGET", 30_000)  # room for the Pareto panels (26 KB) only
    page = write_report(tmp_path / "run.json").read_text()
    assert page.count("<svg") == 1 and page.count("left out to keep it under 1 MB") == 3
    for name in re.findall(r"see (\S+\.png) beside", page):
        assert (tmp_path / name).stat().st_size > 5_000

import json
import shutil
import subprocess

import pytest

from torchslim import cli
from torchslim.report import write_report
from torchslim.report.figures import layer_series, pareto, points

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
    assert "<script src=" not in html and "plotly" in html  # plotly.js is inline, nothing fetched
    assert html.count("data-plot=") == 5  # two Pareto plots, sparsity and bit-width bars, sensitivity
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
    assert dom.stdout.count('class="main-svg"') >= 5, "plotly did not draw the plots"
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

"""The report of a real run that goes through seven techniques (rescnn1d on a small MNIST-1D):
at most 1 MB, nothing fetched, one per-layer chart per technique that records per-layer data,
deltas formatted, axes padded; and the runner's progress bars name the stage that runs."""

import io
import json
import re

import pytest
from rich.console import Console

from torchslim.app.report import write_report
from torchslim.app.report.layers import layer_charts
from torchslim.app.runner import run_recipe
from torchslim.core import progress
from torchslim.core.measure import Record, format_records

pytest.importorskip("matplotlib")
pytest.importorskip("torch_pruning")  # structured pruning

RECIPE = {
    "name": "report of a real run",
    "task": {"name": "mnist1d", "kwargs": {"num_samples": 1000}},
    "model": "rescnn1d",
    "seed": 0,
    "train": {"epochs": 1, "max_steps": 10, "lr": 0.003, "device": "cpu"},
    "stages": [
        {"structured_prune": {"macs_keep": 0.6, "round_to": 4}},
        {"layer_drop": {"count": 1}},
        {"nm": {"n": 2, "m": 4}},
        {"lowrank": {"params_keep": 0.5, "min_saved_macs": 0}},
        {"quantize": {"bits": 8}},
        {"share": {"bits": 4}},
        {"early_exit": {"finetune": {"epochs": 1, "max_steps": 10, "device": "cpu"}}},
    ],
    "export": [],
    "measure": {"batch_size": 16, "repeats": 2},
}
# the chart each technique's stage info gives (early exits: the exit-rate chart)
CHART = {"structured_prune": "layers-structured_prune-structured", "layer_drop": "layers-layer_drop-layer_drop",
         "nm": "layers-nm-nm", "lowrank": "layers-lowrank-lowrank", "quantize": "layers-quantize-quantize",
         "share": "layers-share-share", "early_exit": "exits-early_exit"}
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}  # XML names, never fetched


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run")
    recipe = out / "r.json"
    recipe.write_text(json.dumps(RECIPE))
    terminal = Console(file=io.StringIO(), force_terminal=True, width=160)
    with progress.use_console(terminal), progress.recording() as seen:
        summary = run_recipe(recipe, out=out / "out", log=lambda m: None)
    html = write_report(out / "out" / "run.json")
    return summary, html, seen, terminal.file.getvalue()


@pytest.mark.slow
def test_report_of_a_real_run_is_small_self_contained_and_charts_every_technique(run):
    summary, path, _, _ = run
    html = path.read_text()
    assert len(path.read_bytes()) <= 1_000_000  # measured: about 170 KB for these 8 rows
    assert not re.search(r"<script|<link|<iframe|<img|@import|url\((?!#)", html)  # url(#clip) is in-page
    assert set(re.findall(r"https?://[^\"'<>\s]+", html)) <= NAMESPACES, "a URL the browser could fetch"
    plots = re.findall(r"data-plot='([^']+)'", html)
    assert len(plots) == len(set(plots))
    for stage in summary["stages"]:
        assert CHART[stage["technique"]] in plots, stage["technique"]
    assert plots.count("pareto") == 1 and html.count("<svg") == len(plots)
    for png in ("pareto", *CHART.values()):
        assert (path.parent / f"{png}.png").stat().st_size > 5_000


@pytest.mark.slow
def test_per_layer_charts_carry_the_stage_info_numbers(run):
    summary, _, _, _ = run
    rows = {r["stage"]: r for r in summary["rows"]}
    charts = {c.technique: c for c in layer_charts(summary)}
    layers = rows["structured_prune"]["info"]["layers"]
    kept = [v["out_after"] / v["out_before"] for v in layers.values()]
    assert charts["structured"].series["channels kept"] == pytest.approx(kept)
    assert charts["structured"].labels["channels kept"] == [f"{v['out_after']}/{v['out_before']}" for v in layers.values()]
    assert min(kept) < 1.0  # channels really went
    lr = rows["lowrank"]["info"]["layers"]
    assert charts["lowrank"].labels["rank kept"] == [f"rank {r['rank']}/{r['full_rank']}" if r.get("applied", True)
                                                     else "kept whole" for r in lr]
    plan = rows["quantize"]["info"]["plan"]
    assert charts["quantize"].series["bits"] == [float(p["bits"]) for p in plan]
    nm = rows["nm"]["info"]["layers"]
    assert charts["nm"].series["zeros"] == pytest.approx([r["sparsity"] for r in nm])
    assert all(0.45 <= r["sparsity"] <= 0.55 for r in nm)  # 2 of every 4 weights
    removed = rows["layer_drop"]["info"]["removed"]
    drop = charts["layer_drop"]
    assert [n for n, m in zip(drop.layers, drop.marked) if m] == removed


@pytest.mark.slow
def test_table_deltas_are_formatted_against_the_baseline(run):
    summary, path, _, _ = run
    html = path.read_text()
    base = summary["rows"][0]
    for r in summary["rows"][1:]:
        cells = re.search(rf"<tr><td>{re.escape(r['stage'])}[ ⚑]*</td>(.*?)</tr>", html).group(1)
        pt = (r["metric"] - base["metric"]) * 100
        want = "±0.0 pt" if f"{abs(pt):.1f}" == "0.0" else f"{'−' if pt < 0 else '+'}{abs(pt):.1f} pt"
        assert f"<td>{want}</td>" in cells, (r["stage"], cells)
        change = (r["bytes"] - base["bytes"]) / base["bytes"] * 100
        assert f"<td>{'−' if change < 0 else '+'}{abs(change):.0f} % bytes</td>" in cells
        assert f"<td>{base['bytes'] / r['bytes']:.2f}×</td>" in cells or f"<td>{base['bytes'] / r['bytes']:.1f}×</td>" in cells
    assert not re.search(r"<td>-?\d\.\d{5,}", html), "a raw float in the table"


@pytest.mark.slow
def test_runner_bars_name_the_stage_and_format_records_prints_text(run):
    summary, _, seen, terminal = run
    n = len(RECIPE["stages"])
    assert any(t.startswith("baseline · training") for t in seen)
    assert any(t.startswith(f"stage 5/{n} quantize · calibration batches") for t in seen)
    assert any(t.startswith(f"stage {n}/{n} early_exit · training") and "epoch 1/1" in t for t in seen)
    assert f"stage 5/{n} quantize · calibration batches" in terminal  # drawn on the terminal
    text = str(format_records([Record.from_dict(r) for r in summary["rows"]]))
    assert "<rich.table.Table" not in text
    assert all(r["stage"] in text for r in summary["rows"]) and "accuracy" in text

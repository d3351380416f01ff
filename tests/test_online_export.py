"""Online learning of a fake-quant model re-exports it to its real int8 backend at every
checkpoint (issue 15, point 2): the exported file loads and predicts like the fake-quant model it
came from."""

from __future__ import annotations

import json

import pytest
import yaml

from torchslim.app.online import run_online_recipe

pytest.importorskip("onnxruntime")

RECIPE = {
    "name": "online export", "task": {"name": "digits", "kwargs": {"batch_size": 64}}, "model": "lenet300", "seed": 0,
    "train": {"epochs": 3, "lr": 0.003},
    "stages": [{"prune": {"sparsity": 0.5}}, {"quantize": {"bits": 8, "mode": "weights_only", "backend": "simulate"}}],
    "measure": {"batch_size": 16, "threads": 1, "repeats": 1},
    "stream": {"batch_size": 32, "export": "onnxruntime", "segments": [{"source": "task", "split": "val"}]},
    "online": {"lr": 0.001, "detector": None, "checkpoint_every": 4, "max_batches": 6, "progress": False},
}


def test_fake_quant_model_is_exported_to_onnxruntime_at_checkpoints(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "out"
    assert run_online_recipe(path, out, log=lambda m: None) == 0
    run = json.loads((out / "run.json").read_text())
    exports = run["exports"]
    assert [e["batch"] for e in exports] == [4, 6]  # every checkpoint_every batches, and the end
    for e in exports:
        f = out / e["path"]
        assert f.suffix == ".onnx" and f.stat().st_size == e["bytes"] > 0
        # ORT rounds the same 8-bit grid the fake-quant model learned on: predictions agree
        assert e["agreement_with_fake_quant"] >= 0.97, e
    assert run["online"]["compression_unchanged"] is True


def test_export_of_a_float_model_is_refused_in_one_line(tmp_path, capsys):
    data = {**RECIPE, "stages": [{"prune": {"sparsity": 0.5}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert run_online_recipe(path, tmp_path / "out", log=lambda m: None) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stream.export" in err[0]


def test_report_of_an_online_run_plots_accuracy_over_the_stream(tmp_path):
    pytest.importorskip("matplotlib")
    from torchslim.app import cli

    data = {**RECIPE, "stream": {**RECIPE["stream"], "export": None},
            "eval": {"old": {"source": "task", "split": "test"}}, "online": {**RECIPE["online"], "eval_every": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert run_online_recipe(path, out, log=lambda m: None) == 0
    assert cli.main(["report", str(out / "run.json")]) == 0
    html = (out / "report.html").read_text()
    assert "data-plot='online-accuracy'" in html and "held-out: old" in html
    from torchslim.app.report.dynamic_figures import online_series

    s = online_series(json.loads((out / "run.json").read_text()))
    assert len(s["x"]) == 6 and all(0.0 <= y <= 1.0 for y in s["y"])


def test_exit_figures_from_an_early_exit_stage_info():
    pytest.importorskip("matplotlib")
    from torchslim.app.report.dynamic_figures import dynamic_figures, exit_series

    run = {"rows": [{"stage": "baseline", "info": {}},
                    {"stage": "early_exit", "info": {"exit_rates": [0.7, 0.27, 0.03], "exits_after": ["layers.0", "layers.1"],
                                                     "curve": {"threshold": [0.5, 0.9], "accuracy": [0.97, 0.99],
                                                               "mean_cost": [0.3, 0.5]}}}]}
    (s,) = exit_series(run)
    assert s["labels"] == ["layers.0", "layers.1", "end"] and s["rates"] == [0.7, 0.27, 0.03]
    assert [name for name, _ in dynamic_figures(run)] == ["exits-early_exit", "exit-curve-early_exit"]

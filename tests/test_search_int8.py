"""Issue 13: bit widths in the search are priced by measured ONNX Runtime int8 kernels per layer,
and an int8 policy is a recipe whose quantize stage runs those very kernels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from torchslim.app.runner import run_recipe
from torchslim.app.search import run_search
from torchslim.core.train import TrainConfig, fit
from torchslim.search import Policy, build_cost_model, build_space, verify
from torchslim.search.int8_cost import KINDS, build_int8_table, table_ratio
from torchslim.search.space import GRANULARITIES
from torchslim.zoo import build_model, build_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TASK = {"name": "mnist1d", "kwargs": {"num_samples": 1200}}


def test_int8_table_prices_bit_width_and_granularity_per_layer():
    task = build_task(TASK["name"], **TASK["kwargs"])
    torch.manual_seed(0)
    model = build_model("rescnn1d", task, width=16)
    fit(model, task, TrainConfig(epochs=1, max_steps=10))
    model.eval()
    space = build_space(model, task, step=4, int8=True)
    cm = build_cost_model(model, space, task, batch_size=64, threads=1, grid=2, repeats=3)
    cm.int8 = build_int8_table(cm, model, task, batch_size=64, threads=1, grid=2, repeats=3)
    t8 = cm.int8
    assert set(t8.tables) == set(space.layers) and t8.eager_ms > 0
    for t in t8.tables.values():  # every layout timed as ORT fp32 and both int8 granularities
        for kind in KINDS:
            ms = np.asarray(t[kind])
            assert ms.shape == (len(t["in"]), len(t["out"])) and (ms > 0).all()
            assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all()  # monotone in width
    assert len(t8.calibration) == 3 and all(c["measured_ratio"] > 0 for c in t8.calibration)
    full, narrow = space.uniform(1.0), space.uniform(space.keep_min)
    assert full.keep_float == () and full.granularity == "per_channel"  # all int8, per channel
    # an int8 policy is priced by the int8 table through its curve; a float model by the eager one
    for p in (full, narrow, Policy(full.keep, {}, tuple(space.layers), "per_tensor")):
        assert cm.cost(p)["latency_ratio"] == pytest.approx(t8.ratio(table_ratio(cm, p)))
    assert cm.cost(Policy(full.keep))["latency_ratio"] == pytest.approx(1.0)
    assert cm.cost(narrow)["latency_ratio"] <= cm.cost(full)["latency_ratio"] + 1e-12
    # keeping a layer float prices it at ORT fp32: by hand, from the table's cells at full width
    kf = Policy(full.keep, {}, (space.layers[1],), "per_channel")
    diff = table_ratio(cm, kf) - table_ratio(cm, full)
    t = t8.tables[space.layers[1]]
    assert diff == pytest.approx((t["fp32"][-1][-1] - t["per_channel"][-1][-1]) / t8.eager_ms)
    # the check times the policy's real ORT int8 graph, and recalibrates the int8 curve
    row = verify.measure_ratio(cm, model, narrow, task, batch_size=64, repeats=3, blocks=2)
    assert row["measured_ratio"] > 0 and len(row["block_ratios"]) == 2
    verify.recalibrate(cm, narrow, row["measured_ratio"])
    assert t8.calibration[-1]["source"] == "check" and len(cm.calibration) == 9  # eager one untouched


def test_int8_search_writes_a_recipe_on_ort_kernels_that_run_reproduces(tmp_path):
    src = {"task": TASK, "model": {"name": "rescnn1d", "kwargs": {"width": 16}}, "seed": 0,
           "train": {"epochs": 1, "max_steps": 20}, "measure": {"batch_size": 64, "threads": 1},
           "search": {"budget": {"latency": "1.0x"}, "method": "random", "trials": 2, "step": 4, "int8": True,
                      "table": {"grid": 2, "repeats": 3}, "checks": 2, "finetune": {"max_steps": 2, "epochs": 1}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(src))
    out = tmp_path / "out"
    rc = run_search(path, out, log=lambda s: None)
    summary = json.loads((out / "search.json").read_text())
    saved = json.loads((out / "cost.json").read_text())
    assert "int8" in saved and saved["int8"]["tables"]
    trials = json.loads((out / "trials.json").read_text())
    assert all(t["policy"]["granularity"] in GRANULARITIES for t in trials)
    if not summary["budget_held"]:  # possible only on a badly loaded machine: then nothing is written
        assert rc == 1 and not (out / "best_recipe.yaml").exists()
        return
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    q = recipe["stages"][-1]["quantize"]
    assert q["backend"] == "onnxruntime" and q["mode"] == "static" and q["granularity"] == summary["best"]["policy"]["granularity"]
    assert q["layers"]["exclude"] == summary["best"]["policy"]["keep_float"]
    run = run_recipe(out / "best_recipe.yaml", tmp_path / "run", log=lambda s: None)
    assert run["rows"][-1]["metric"] == pytest.approx(summary["best"]["test"], abs=1e-6)  # the same int8 model

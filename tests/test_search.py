"""Policy search (issue 13): the space follows the dependency graph, costs are exact (MACs,
parameters) or measured (latency table), every maker meets its budget, and the best policy is a
recipe that ``torchslim run`` reproduces to the same metric."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from torchslim.app.recipe import RecipeError
from torchslim.app.runner import run_recipe
from torchslim.app.search import parse_budget, read_search_recipe, run_search
from torchslim.core.errors import ConfigError
from torchslim.core.measure import count_macs, count_nonzeros, count_params
from torchslim.core.train import TrainConfig, fit
from torchslim.pruning import graph
from torchslim.search import (
    Budget,
    Policy,
    agent,
    build_cost_model,
    build_space,
    evaluate,
    fit_budget,
    materialize,
    optuna_search,
    sensitivity_rule,
    to_recipe,
    uniform,
    user_rules,
)
from torchslim.search.trials import Evaluator, best, pareto
from torchslim.zoo import build_model, build_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TASK = {"name": "mnist1d", "kwargs": {"num_samples": 1200}}


@pytest.fixture(scope="module")
def task():
    return build_task(TASK["name"], **TASK["kwargs"])


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("rescnn1d", task, width=16)
    fit(model, task, TrainConfig(epochs=2, lr=3e-3))
    from torchslim.export.weights import save_weights

    path = tmp_path_factory.mktemp("w") / "base.safetensors"
    save_weights(model, path)
    return model.eval(), path


def _space(model, task, **kw):
    return build_space(model, task, step=4, **kw)


def test_groups_follow_the_dependency_graph(trained, task):
    model, _ = trained
    space = _space(model, task)
    members = {g.root: set(g.members) for g in space.groups}
    # both sides of every residual add move together; the classifier's outputs never do
    assert {"stem.0", "layers.0.conv2"} in members.values()
    assert {"layers.1.shortcut.0", "layers.1.conv2", "layers.2.conv2", "layers.3.conv2"} in members.values()
    assert all("fc" not in m for m in members.values())
    assert len(space.groups) == 6 and sum(len(m) for m in members.values()) == 10


def test_exact_macs_params_and_widths(trained, task):
    model, _ = trained
    space = _space(model, task, sparsities=(0.0, 0.5))
    cm = build_cost_model(model, space, task, latency=False)
    ex = task.example_inputs(batch_size=1)
    rng = random.Random(0)
    for _ in range(3):
        p = space.clip(Policy({r: rng.uniform(0.2, 1) for r in space.roots}, {"layers.2.conv1": 0.5}))
        m = materialize(model, space, p, ex)
        assert graph.layer_widths(m) == cm.widths(p)
        assert cm.macs(p) == count_macs(m, ex)  # closed form == counted on the real pruned model
        counts = cm.counts(model, p, ex)
        # a float policy's stored bytes: 4 per non-zero (size budgets compare bytes)
        assert counts == {"params": count_params(m), "nonzeros": count_nonzeros(m), "bytes": 4 * count_nonzeros(m)}
        w = dict(m.named_parameters())["layers.2.conv1.weight"]
        assert abs(float((w == 0).float().mean()) - 0.5) <= 1.0 / w.numel() + 1e-9


def test_policy_recipe_really_gives_those_widths(trained, task):
    model, path = trained
    space = _space(model, task, sparsities=(0.0, 0.7))
    cm = build_cost_model(model, space, task, latency=False)
    p = space.canonical(Policy({"stem.0": 0.5, "layers.0.conv1": 0.25, "layers.1.shortcut.0": 0.75,
                                "layers.2.conv1": 0.5}, {"layers.3.conv1": 0.7}))
    base = {"task": TASK, "model": {"name": "rescnn1d", "kwargs": {"width": 16}, "weights": str(path)}, "seed": 0}
    recipe = to_recipe(p, space, base, {"max_steps": 3, "epochs": 1})
    pruned, metrics = evaluate(model, recipe, task)
    assert graph.layer_widths(pruned) == cm.widths(p)  # the techniques did what the policy says
    w = dict(pruned.named_parameters())["layers.3.conv1.weight"]
    assert abs(float((w == 0).float().mean()) - 0.7) <= 1.0 / w.numel() + 1e-9  # kept through fine-tune
    assert 0.0 <= metrics["test"] <= 1.0


def test_every_rule_meets_the_budget_and_uses_it(trained, task):
    model, _ = trained
    space = _space(model, task)
    cm = build_cost_model(model, space, task, latency=False)

    def cost(p):
        return cm.cost(p)["macs_ratio"]

    sens = {r: 0.1 * i for i, r in enumerate(space.roots)}
    made = {"uniform": uniform(space, cost, 0.5), "sensitivity": sensitivity_rule(sens, space, cost, 0.5),
            "rules": user_rules([{"match": "stem.*", "keep": 1.0}, {"match": "layers.3.*", "weight": 3}], space, cost, 0.5),
            "fit": fit_budget(Policy({r: random.Random(1).uniform(0.3, 1) for r in space.roots}), space, cost, 0.5)}
    for name, (p, ok) in made.items():
        assert ok and cost(p) <= 0.5 + 1e-9, name
    u, _ = made["uniform"]
    wider = space.uniform(max(u.keep.values()) + 1.0 / 16)  # one channel-step wider breaks it
    assert cost(wider) > 0.5
    assert made["rules"][0].keep["stem.0"] == 1.0
    s, _ = made["sensitivity"]  # the most sensitive group keeps the most channels
    assert s.keep[space.roots[-1]] == max(s.keep.values()) and s.keep[space.roots[0]] == min(s.keep.values())


def test_latency_table_is_measured_and_ordered(trained, task):
    model, _ = trained
    space = _space(model, task)
    cm = build_cost_model(model, space, task, batch_size=32, threads=1, grid=3, repeats=3)
    assert set(cm.tables) == set(space.layers) and cm.base_ms > 0
    full = cm.cost(Policy({r: 1.0 for r in space.roots}))["latency_ratio"]
    narrow = cm.cost(space.uniform(space.keep_min))["latency_ratio"]
    assert full == pytest.approx(1.0) and 0.0 < narrow < 1.0
    from torchslim.search import cost as cost_mod

    row = cost_mod.check(cm, model, [space.uniform(0.5)], task, batch_size=32, repeats=3)[0]
    assert row["measured_ratio"] > 0 and row["predicted_ratio"] > 0


def _recipe(tmp_path, **search):
    src = {"task": TASK, "model": {"name": "rescnn1d", "kwargs": {"width": 16}}, "seed": 0,
           "train": {"epochs": 2, "lr": 0.003}, "measure": {"batch_size": 32, "threads": 1, "repeats": 3},
           "search": {"budget": {"macs": "0.5x"}, "trials": 4, "step": 4,
                      "finetune": {"max_steps": 4, "epochs": 1}, **search}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(src))
    return path


def test_best_policy_recipe_reproduces_with_torchslim_run(tmp_path):
    path = _recipe(tmp_path, method="tpe")
    out = tmp_path / "out"
    assert run_search(path, out, log=lambda s: None) == 0
    summary = json.loads((out / "search.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 4 and all(t["macs_ratio"] <= 0.5 + 1e-9 for t in trials)
    top = summary["best"]
    assert top["val"] == max(t["val"] for t in trials)
    run = run_recipe(out / "best_recipe.yaml", tmp_path / "run", log=lambda s: None)
    final = run["rows"][-1]
    assert final["metric"] == pytest.approx(top["test"], abs=1e-6)  # same metric, same split
    assert final["macs_per_sample"] == pytest.approx(top["macs_ratio"] * run["rows"][0]["macs_per_sample"], rel=1e-6)
    # resume: the study continues from SQLite; the 4 finished trials are not re-run
    path.write_text(path.read_text().replace("trials: 4", "trials: 6"))
    assert run_search(path, out, resume=True, log=lambda s: None) == 0
    again = json.loads((out / "trials.json").read_text())
    assert len(again) == 6 and [t["policy"] for t in again[:4]] == [t["policy"] for t in trials]


def test_rl_agent_and_nsga2_run_a_few_trials(trained, task, tmp_path):
    model, path = trained
    space = _space(model, task)
    cm = build_cost_model(model, space, task, latency=False)
    base = {"task": TASK, "model": {"name": "rescnn1d", "kwargs": {"width": 16}, "weights": str(path)}, "seed": 0}
    ev = Evaluator(model, task, space, cm, Budget("macs", 0.4), base, {"max_steps": 2, "epochs": 1}, log=lambda s: None)
    recs = agent.run(ev, 3, seed=0, warmup=1)
    assert len(recs) == 3 and all(r["macs_ratio"] <= 0.4 + 1e-9 and r["feasible"] for r in recs)
    ev2 = Evaluator(model, task, space, cm, Budget("macs", 0.4), base, {"max_steps": 2, "epochs": 1}, log=lambda s: None)
    recs2 = optuna_search.run(ev2, "nsga2", 4, f"sqlite:///{tmp_path / 's.db'}", "n", seed=0)
    assert len(recs2) == 4
    front = pareto(recs2, "macs_ratio")
    assert front and all(not any(o["val"] > f["val"] and o["macs_ratio"] < f["macs_ratio"] for o in recs2) for f in front)
    assert best(recs2) is None or best(recs2)["macs_ratio"] <= 0.4 + 1e-9


def test_bad_search_blocks_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"search.budget.latency: write a share"):
        parse_budget({"latency": "fast"})
    with pytest.raises(ConfigError, match=r"search.budget.latency: must be in \(0, 1\]"):
        parse_budget({"latency": "2x"})
    with pytest.raises(ConfigError, match="must be a share of the baseline"):
        parse_budget({"macs": "3MB"})
    assert parse_budget({"size": "1MB"}, base_nonzero_bytes=4_000_000).ratio == pytest.approx(0.25)
    with pytest.raises(RecipeError, match="search.method: unknown method"):
        read_search_recipe(_recipe(tmp_path, method="genetic"))
    with pytest.raises(RecipeError, match="search.trials"):
        read_search_recipe(_recipe(tmp_path, trials=0))
    with pytest.raises(ConfigError, match="Budget.ratio"):
        Budget("latency", 0.0)


def test_keep_float_choices_become_a_quantize_stage(trained, task):
    from torchslim.app.recipe import load_recipe

    model, path = trained
    space = _space(model, task, int8=True)
    p = space.canonical(Policy({"stem.0": 0.5}, {}, ("fc", "stem.0")))
    assert p.keep_float == ("stem.0", "fc")  # forward order, only real layers
    base = {"task": TASK, "model": {"name": "rescnn1d", "kwargs": {"width": 16}, "weights": str(path)}, "seed": 0}
    recipe = to_recipe(p, space, base, None)
    stages = load_recipe(recipe).stages
    assert [s.technique for s in stages] == ["structured_prune", "quantize"]
    assert stages[-1].config.layers.exclude == ("stem.0", "fc") and stages[-1].config.bits == 8
    _, metrics = evaluate(model, recipe, task)  # ONNX Runtime int8 with those layers kept float
    assert 0.0 <= metrics["test"] <= 1.0


def test_resumed_random_search_draws_new_policies(tmp_path):
    """A resumed study's sampler is reseeded: seeded as before, random search would draw the
    finished policies again (answered from the cache: trials spent, nothing new learnt)."""
    path = _recipe(tmp_path, method="random")
    path.write_text(path.read_text().replace("trials: 4", "trials: 2"))
    out = tmp_path / "out"
    assert run_search(path, out, log=lambda s: None) == 0
    first = json.loads((out / "trials.json").read_text())
    path.write_text(path.read_text().replace("trials: 2", "trials: 4"))
    assert run_search(path, out, resume=True, log=lambda s: None) == 0
    again = json.loads((out / "trials.json").read_text())
    seen = {json.dumps(t["policy"], sort_keys=True) for t in first}
    assert len(again) == 4 and not any(t.get("cached") for t in again[2:])
    assert not seen & {json.dumps(t["policy"], sort_keys=True) for t in again[2:]}

"""Issue 13 items 1 + 4: ``torchslim search`` with ``space: transformer`` (heads, FFN units, whole
layers dropped, int8 / float / blocks per Linear group), the found plan re-run by ``run_recipe``
to the same metric, a resumed search that re-runs no finished plan, and one-line refusals of the
other space's fields. A tiny BERT from a config (random weights; nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from test_search_transformer import tiny_encoder, tiny_task
from torchslim import zoo
from torchslim.app.recipe import RecipeError
from torchslim.app.runner import run_recipe
from torchslim.app.search import read_search_recipe, run_search
from torchslim.core.errors import ConfigError
from torchslim.pruning.layers import Bypass
from torchslim.search import transformer_eval as te
from torchslim.search import transformer_space as ts
from torchslim.search.policy import evaluate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def tiny_zoo(monkeypatch):
    monkeypatch.setitem(zoo.TASKS, "tiny_bert_e", tiny_task)
    monkeypatch.setitem(zoo.MODELS, "tiny_bert_e", lambda: tiny_encoder())


def _recipe(path, **search):
    # random search: its suggestions do not depend on the scores (which int8 kernels vary by CPU)
    block = {"space": "transformer", "budget": {"macs": "0.7x"}, "method": "random", "trials": 4, "finetune": None,
             "layer_drop": True, "timing_batches": 1, "table": {"repeats": 2}, "seed": 0, **search}
    data = {"task": {"name": "tiny_bert_e"}, "model": {"name": "tiny_bert_e"}, "seed": 0,
            "measure": {"batch_size": 8, "threads": 1, "repeats": 2}, "search": block}
    path.write_text(yaml.safe_dump(data))
    return path


def test_transformer_search_writes_a_plan_that_run_reproduces_and_resumes(tmp_path, tiny_zoo, monkeypatch):
    recipe, out = _recipe(tmp_path / "s.yaml"), tmp_path / "out"
    assert run_search(recipe, out, log=lambda s: None) == 0
    summary = json.loads((out / "search.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    assert summary["space"]["kind"] == "transformer" and summary["space"]["layer_drop"] is True
    assert summary["budget"] == {"kind": "macs", "ratio": 0.7} and len(trials) == 4
    # the two uniform int8 plans are the first trials (full widths: MACs 1.0x, over a 0.7x budget)
    assert [t["maker"] for t in trials] == ["enqueued", "enqueued", "random", "random"]
    assert trials[0]["macs_ratio"] == pytest.approx(1.0) and not trials[0]["feasible"]
    best = summary["best"]
    feasible = [t for t in trials if t["macs_ratio"] <= 0.7]
    assert best is not None and best["macs_ratio"] <= 0.7
    assert best["val"] == max(t["val"] for t in feasible)
    assert (out / "report.html").exists() and (out / "pareto.json").exists()
    # the written recipe re-runs through the runner to the very metric the search measured
    plan = yaml.safe_load((out / "best_recipe.yaml").read_text())
    run = run_recipe(plan, tmp_path / "run", log=lambda s: None)
    assert run["rows"][-1]["metric"] == pytest.approx(best["test"], abs=1e-6)
    # resumed with 2 more trials: the 4 finished plans are not built again, 2 new trials run
    built = []
    real = te.PlanEvaluator.build
    monkeypatch.setattr(te.PlanEvaluator, "build", lambda self, p: built.append(p.key()) or real(self, p))
    _recipe(tmp_path / "s.yaml", trials=6)
    assert run_search(recipe, out, resume=True, log=lambda s: None) == 0
    again = json.loads((out / "search.json").read_text())
    assert again["resumed_trials"] == 4 and again["trials"] == 6
    finished = {ts.TransformerPolicy.from_dict(t["policy"]).key() for t in trials}
    later = json.loads((out / "trials.json").read_text())[4:]
    assert [t.get("resumed") for t in later] == [None, None]
    # two new plans (the resumed sampler does not draw the finished ones again), each built once,
    # then the answer rebuilt
    assert len(built) == 3 and not set(built[:2]) & finished and built[:2] == [
        ts.TransformerPolicy.from_dict(t["policy"]).key() for t in later]


def test_dropped_layer_becomes_an_identity_and_its_choices_are_not_written(tiny_zoo):
    model, task = tiny_encoder(), tiny_task()
    space = ts.build_transformer_space(model, drop=True)
    a, b = (x.name for x in space.layers)
    p = ts.uniform_policy(space, quant="int8")
    p.drop = (a,)
    stages = ts.to_stages(p, space)
    assert stages[0] == {"name": "drop-layers", "layer_drop": {"drop": [a]}}
    assert [next(k for k in s if k != "name") for s in stages] == ["layer_drop", "quantize"]
    assert ts.macs_per_token(p, space) == pytest.approx(ts.macs_per_token(ts.TransformerPolicy(), space) / 2)
    base = {"task": {"name": "tiny_bert_e"}, "model": {"name": "tiny_bert_e"}, "seed": 0}
    float_plan = ts.TransformerPolicy(drop=(a,))
    built, _ = evaluate(model, ts.to_recipe(float_plan, space, base), task, splits=())
    assert isinstance(built.get_submodule(a), Bypass)
    # reference: layer b alone on the embeddings (layer a an identity)
    ref = tiny_encoder()
    ref.bert.encoder.layer[0] = Bypass(a)
    inputs = next(iter(task.val))[0]
    with torch.no_grad():
        assert torch.allclose(built.eval()(**inputs), ref(**inputs), atol=1e-6)
    with pytest.raises(ConfigError, match=r"TransformerPolicy\.drop: keep at least one encoder layer"):
        ts.to_stages(ts.TransformerPolicy(drop=(a, b)), space)
    assert ts.TransformerPolicy.from_dict(p.to_dict()).key() == p.key()
    assert "drop" not in ts.TransformerPolicy().to_dict()  # earlier plans keep their keys


CNN = {"space": "cnn", "layer_drop": False, "timing_batches": 4}  # the CNN space: no transformer field set


@pytest.mark.parametrize("search,field", [
    ({"sparsities": [0.5]}, "sparsities"), ({"method": "rl"}, "method"), ({"workers": 2}, "workers"),
    ({"share_bits": [4]}, "share_bits"), ({"space": "cnn"}, "layer_drop"), ({**CNN, "heads_keep": [1.0, 0.5]}, "heads_keep"),
    ({"space": "rnn"}, "space"), ({"heads_keep": [0.0]}, "heads_keep"), ({**CNN, "ranks": [1.5]}, "ranks"),
    ({**CNN, "share_bits": [9]}, "share_bits")])
def test_a_field_of_the_other_space_or_out_of_range_is_refused_naming_it(tmp_path, tiny_zoo, search, field):
    with pytest.raises(RecipeError, match=rf"^search\.{field}: "):
        read_search_recipe(_recipe(tmp_path / "s.yaml", **search))


def test_the_cnn_space_takes_ranks_and_share_bits(tmp_path, tiny_zoo):
    _, spec = read_search_recipe(_recipe(tmp_path / "s.yaml", **CNN, ranks=[0.25, 0.5], share_bits=[4]))
    assert spec.space == "cnn" and spec.ranks == [0.25, 0.5] and spec.share_bits == [4]

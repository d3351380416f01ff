"""Low-rank ratio and share bits as per-layer choices of the CNN search space (issue 13, item 1):
the policy carries them (older policies keep their keys), clip enforces the constraints, the
stages run through the runner's own code, MACs and stored bytes are exact on the model the
recipe builds, and Optuna proposes legal policies. Tolerances are stated where numbers are float."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from torchslim.app.recipe import load_recipe
from torchslim.core.errors import ConfigError
from torchslim.core.measure import count_nonzeros
from torchslim.core.train import TrainConfig, fit
from torchslim.lowrank import LowRankPair
from torchslim.pruning.structured import layer_macs
from torchslim.quantization.fake import FakeQuantLayer
from torchslim.search import (
    Budget,
    Policy,
    build_cost_model,
    build_space,
    evaluate,
    fit_budget,
    lowrank_cost,
    materialize,
    optuna_search,
    to_recipe,
)
from torchslim.search.int8_cost import Int8Table
from torchslim.search.policy import to_stages
from torchslim.search.space import SearchSpace, _lowrank_shapes, factor_rank
from torchslim.search.trials import Evaluator
from torchslim.sharing import SharedWeight, shared_layers
from torchslim.zoo import build_model, build_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TASK = {"name": "mnist1d", "kwargs": {"num_samples": 1200}}
FT = {"max_steps": 3, "epochs": 1}


@pytest.fixture(scope="module")
def task():
    return build_task(TASK["name"], **TASK["kwargs"])


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("rescnn1d", task, width=16)
    fit(model, task, TrainConfig(epochs=1, lr=3e-3))
    from torchslim.export.weights import save_weights

    path = tmp_path_factory.mktemp("w") / "base.safetensors"
    save_weights(model, path)
    base = {"task": TASK, "model": {"name": "rescnn1d", "kwargs": {"width": 16}, "weights": str(path)}, "seed": 0}
    return model.eval(), base


def _space(model, task, **kw):
    return build_space(model, task, step=4, ranks=(0.25, 0.5), share_bits=(2, 4), **kw)


def test_policy_round_trip_and_old_policies_unchanged():
    p = Policy({"stem.0": 0.5}, {"layers.3.conv1": 0.5}, ("fc",), "per_tensor", {"layers.0.conv1": 0.25}, {"fc": 4})
    d = p.to_dict()
    assert d["rank"] == {"layers.0.conv1": 0.25} and d["share"] == {"fc": 4}
    assert Policy.from_dict(json.loads(json.dumps(d))) == p
    old = {"keep": {"stem.0": 0.5}, "sparsity": {"layers.3.conv1": 0.5}, "keep_float": None}  # no rank / share keys
    q = Policy.from_dict(old)
    assert q.rank == {} and q.share == {} and q.to_dict() == old
    assert q.key() == json.dumps(old, sort_keys=True)  # the journal key of an older trial is the same


def test_space_checks_and_describe(trained, task):
    model, _ = trained
    plain = build_space(model, task, step=4)
    assert "ranks" not in plain.describe() and "share_bits" not in plain.describe()  # old summaries unchanged
    d = _space(model, task).describe()
    assert d["ranks"] == [0.25, 0.5] and d["share_bits"] == [2, 4]
    for bad in ((0.0,), (1.0,), (-0.5,), (math.nan,), (True,), tuple(np.linspace(0.05, 0.9, 17))):
        with pytest.raises(ConfigError, match=r"^SearchSpace\.ranks: "):
            SearchSpace([], [], None, ranks=bad)
    for bad in ((0,), (9,), (2.5,), (True,), (4,) * 17):
        with pytest.raises(ConfigError, match=r"^SearchSpace\.share_bits: "):
            SearchSpace([], [], None, share_bits=bad)
    with pytest.raises(ConfigError, match=r"^SearchSpace\.share_bits: ONNX Runtime"):
        SearchSpace([], [], None, int8=True, share_bits=(4,))  # ORT stores a float shared layer as fp32
    SearchSpace([], [], None, int8=True, int8_backend="simulate", share_bits=(4,))


def test_factorizable_layers_follow_lowrank(trained, task):
    model, _ = trained
    space = _space(model, task)
    assert "fc" not in space.shapes and space.shapes["layers.0.conv1"] == (16, 16, 3)  # classifier never
    assert space.shapes["stem.0"] == (1, 16, 5) and len(space.shapes) == len(space.layers) - 1
    dw = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Flatten(), nn.Linear(8, 3))
    assert _lowrank_shapes(dw, ["0", "1", "3"], None) == {"1": (4, 8, 1), "3": (8, 3, 1)}  # groups > 1: not
    assert factor_rank(0.5, 48, 16) == 6 and factor_rank(0.25, 48, 16) == 3  # floor(s * 48*16 / 64)
    assert factor_rank(0.5, 1, 16) is None and factor_rank(0.01, 4, 4) == 1  # no rank below 1 / at least 1


def test_clip_snaps_and_enforces_the_constraints(trained, task):
    model, _ = trained
    space = _space(model, task, sparsities=(0.0, 0.5))
    raw = Policy({}, {"layers.0.conv1": 0.5, "layers.3.conv1": 0.45},
                 rank={"layers.0.conv1": 0.3, "layers.1.conv1": 0.9, "fc": 0.5, "nope": 0.25, "layers.2.conv1": 0.5},
                 share={"layers.0.conv1": 4, "layers.3.conv1": 5, "fc": 1, "layers.2.conv2": 0, "nope": 4})
    p = space.clip(raw)
    assert p.rank == {"layers.0.conv1": 0.25, "layers.2.conv1": 0.5}  # 0.9 -> 1.0 = none; classifier, unknown dropped
    assert p.share == {"layers.3.conv1": 4, "fc": 2}  # rank wins over share; 0 = not shared
    assert p.sparsity == {"layers.3.conv1": 0.5}  # rank wins over sparsity
    assert space.clip(p) == p and space.canonical(p).rank == p.rank
    off = build_space(model, task, step=4).clip(raw)
    assert off.rank == {} and off.share == {}  # dimensions off: nothing passes
    fitted, _ = fit_budget(p, space, lambda q: sum(q.keep.values()) / len(q.keep), 0.6)
    assert fitted.rank == p.rank and fitted.share == p.share  # the budget fit carries them


def test_stages_with_ranks_shares_and_int8_run_and_keep_factors_float(trained, task):
    model, base = trained
    space = _space(model, task, int8=True, int8_backend="simulate")
    p = space.clip(Policy({"stem.0": 0.5}, {}, ("layers.3.conv2",), "per_channel",
                          {"layers.0.conv1": 0.5, "layers.1.conv1": 0.25}, {"layers.2.conv1": 4, "fc": 2}))
    stages = to_stages(p, space, FT)
    # ranks at the widths after the structured stage: c_in = 8 (stem group at 0.5), k = 3, c_out = 16:
    # floor(0.5 * 24*16 / 40) = 4 and floor(0.25 * 24*16 / 40) = 2
    assert [next(iter(s.keys() - {"name"})) for s in stages] == ["structured_prune", "lowrank", "train", "share", "quantize"]
    assert stages[1] == {"lowrank": {"rank": {"layers.0.conv1": 4, "layers.1.conv1": 2},
                                     "layers": ["layers.0.conv1", "layers.1.conv1"], "min_mac_saving": 0.0, "min_saved_macs": 0}}
    assert stages[3] == {"share": {"bits": {"layers.2.conv1": 4, "fc": 2}, "layers": ["layers.2.conv1", "fc"]}}
    assert stages[4]["quantize"]["layers"]["exclude"] == [
        "layers.0.conv1.0", "layers.0.conv1.1", "layers.1.conv1.0", "layers.1.conv1.1", "layers.2.conv1", "layers.3.conv2", "fc"]
    recipe = to_recipe(p, space, base, FT)
    assert len(load_recipe(recipe).stages) == 5
    out, metrics = evaluate(model, recipe, task)
    assert 0.0 <= metrics["test"] <= 1.0
    mods = dict(out.named_modules())
    for name, r in (("layers.0.conv1", 4), ("layers.1.conv1", 2)):
        assert isinstance(mods[name], LowRankPair) and mods[name][0].out_channels == r
        assert not isinstance(mods[f"{name}.0"], FakeQuantLayer) and not isinstance(mods[f"{name}.1"], FakeQuantLayer)  # neither
    shared = shared_layers(out)
    assert set(shared) == {"layers.2.conv1", "fc"} and len(shared["fc"].codebook) <= 4
    assert isinstance(mods["layers.2.conv2"], FakeQuantLayer) and not isinstance(mods["layers.3.conv2"], FakeQuantLayer)


def test_ort_int8_keeps_both_factors_float(trained, task):
    import onnx

    model, base = trained
    space = build_space(model, task, step=4, ranks=(0.5,), int8=True)  # share bits refused with ORT int8
    p = space.clip(Policy({}, {}, (), "per_channel", {"layers.1.conv1": 0.5}))
    out, _ = evaluate(model, to_recipe(p, space, base, None), task)
    graph = onnx.load_from_string(out.onnx_bytes).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    quantized = {n.name: producer.get(n.input[1]) == "DequantizeLinear" for n in graph.node if n.op_type in ("Conv", "Gemm")}
    assert out.info["excluded_layers_not_found"] == []
    factors = {k: v for k, v in quantized.items() if "/conv1/conv1." in k and "layers.1/" in k}
    assert len(factors) == 2 and not any(factors.values())  # neither factor quantized
    assert sum(quantized.values()) == len(quantized) - 2  # every other layer is


def test_exact_macs_of_a_factorized_policy(trained, task):
    model, base = trained
    space = _space(model, task)
    cm = build_cost_model(model, space, task, latency=False)
    p = space.canonical(Policy({"stem.0": 0.5, "layers.1.shortcut.0": 0.75},
                               rank={"stem.0": 0.5, "layers.0.conv1": 0.5, "layers.2.conv2": 0.25}))
    out, _ = evaluate(model, to_recipe(p, space, base, FT), task)
    ex = task.example_inputs(batch_size=1)
    macs = layer_macs(out, ex)
    pairs = {f"{n}.{i}" for n in ("stem.0", "layers.0.conv1", "layers.2.conv2") for i in (0, 1)}
    assert pairs <= set(macs) and not {"stem.0", "layers.0.conv1", "layers.2.conv2"} & set(macs)
    assert cm.macs(p) == pytest.approx(sum(macs.values()), rel=1e-12)  # closed form == the real factorized model
    # stem.0 at 8 outputs, fan-in 1*5: r = max(1, floor(0.5 * 40 / 13)) = 1, MACs share r * 13 / 40
    assert lowrank_cost.mac_factor(space, p)["stem.0"] == pytest.approx(13 / 40, rel=1e-12)
    assert macs["stem.0.0"] + macs["stem.0.1"] == round(cm.base_macs["stem.0"] * 0.5 * 13 / 40)
    mat = materialize(model, space, p, ex)
    assert layer_macs(mat, ex) == macs  # the counting copy is factorized the same way
    assert cm.counts(model, p, ex)["nonzeros"] == count_nonzeros(mat)


def _by_hand(model: nn.Module, bits: dict[str, int]) -> int:
    """Stored bytes from the weights: 4 per non-zero, a shared weight ceil(nz * bits / 8) + codebook."""
    shared = shared_layers(model)
    total = 0
    for name, mod in model.named_modules():
        if ".parametrizations" in name:
            continue  # the codebook (priced below) and the emptied original of a shared weight
        for t in mod.parameters(recurse=False):
            total += 4 * int(torch.count_nonzero(t.detach()))  # biases, norms, unshared weights
        if name in shared:
            sw: SharedWeight = shared[name]
            total += math.ceil(int(sw.mask.sum()) * bits[name] / 8) + 2 ** bits[name] * 4
    return total


def test_bytes_of_a_shared_policy_match_the_evaluated_weights(trained, task):
    model, base = trained
    space = _space(model, task, sparsities=(0.0, 0.5))
    cm = build_cost_model(model, space, task, latency=False)
    p = space.canonical(Policy({"stem.0": 0.5}, {"layers.2.conv1": 0.5}, rank={"layers.0.conv1": 0.5},
                               share={"layers.2.conv1": 2, "fc": 4}))
    out, _ = evaluate(model, to_recipe(p, space, base, FT), task)
    ex = task.example_inputs(batch_size=1)
    # parametrized modules hold the codebook (counted in the hand formula) and an emptied original
    assert cm.counts(model, p, ex)["bytes"] == _by_hand(out, p.share)  # exact
    # int8: 1 byte per non-zero of each quantized weight; shared and factorized layers stay float
    s8 = _space(model, task, sparsities=(0.0, 0.5), int8=True, int8_backend="simulate")
    p8 = s8.canonical(Policy(p.keep, p.sparsity, ("layers.3.conv2",), "per_channel", p.rank, p.share))
    mat = materialize(model, s8, p8, ex)
    w = {n: int(torch.count_nonzero(m.weight)) for n, m in mat.named_modules() if n in s8.layers and not isinstance(m, LowRankPair)}
    int8 = sum(v for n, v in w.items() if n not in ("layers.3.conv2", "layers.2.conv1", "fc"))
    cm8 = build_cost_model(model, s8, task, latency=False)
    assert cm8.counts(model, p8, ex)["bytes"] == cm.counts(model, p, ex)["bytes"] - 3 * int8  # 4 -> 1 byte each


def test_float_policy_size_ratio_is_the_old_nonzeros_ratio(trained, task):
    model, base = trained
    space = _space(model, task, sparsities=(0.0, 0.5))
    cm = build_cost_model(model, space, task, latency=False)
    ev = Evaluator(model, task, space, cm, Budget("nonzeros", 0.5), base, None, log=lambda s: None)
    ex = task.example_inputs(batch_size=1)
    p = space.canonical(Policy({"stem.0": 0.5, "layers.0.conv1": 0.75}, {"layers.3.conv1": 0.5}))
    old = cm.counts(model, p, ex)["nonzeros"] / cm.counts(model, Policy(), ex)["nonzeros"]
    assert ev.cost(p) == old  # exactly: 4 * nz / (4 * base nz)
    assert cm.counts(model, Policy(), ex)["bytes"] == 4 * count_nonzeros(model)
    shared = space.canonical(Policy(p.keep, p.sparsity, share={"layers.2.conv1": 2}))
    assert ev.cost(shared) < old  # 2-bit indices: smaller than fp32


def test_latency_prices_a_factorized_layer_by_its_measured_factor(trained, task):
    model, _ = trained
    space = _space(model, task)
    cm = build_cost_model(model, space, task, latency=False)
    ms = [[1.0, 2.0], [3.0, 4.0]]
    cm.tables = {n: {"in": [4, 16], "out": [4, 16], "ms": ms} for n in space.layers}
    cm.tables["layers.2.conv1"] = dict(cm.tables["layers.2.conv1"], lowrank={"shares": [0.25, 0.5], "factor": [0.6, 0.8]})
    full = cm.latency_ms(Policy())
    p = space.clip(Policy({}, rank={"layers.2.conv1": 0.25}, share={"fc": 2}))
    assert cm.latency_ms(p) == pytest.approx(full - 4.0 * (1 - 0.6), abs=1e-12)  # 4 ms (16x16) * 0.6; share: no change
    slow = space.clip(Policy({}, rank={"layers.2.conv1": 0.5}))
    cm.tables["layers.2.conv1"]["lowrank"]["factor"][1] = 1.5  # a pair slower than its dense layer (small layers)
    ratio = (full + 4.0 * 0.5) / full
    assert cm.cost(slow)["latency_ratio"] == pytest.approx(ratio, rel=1e-12) and ratio > 1  # not clamped at 1
    cm.tables["layers.2.conv1"]["lowrank"]["factor"][1] = 0.8
    saved = json.loads(json.dumps(cm.to_dict()))
    assert saved["tables"]["layers.2.conv1"]["lowrank"] == {"shares": [0.25, 0.5], "factor": [0.6, 0.8]}  # resumable
    # int8 pricing: the factorized layer stays float, at the ORT fp32 grid times its factor
    cm.int8 = Int8Table({n: {"in": [4, 16], "out": [4, 16], "fp32": ms, "per_channel": [[0.5, 1.0], [1.5, 2.0]],
                             "per_tensor": ms} for n in space.layers}, eager_ms=10.0)
    p8 = Policy(p.keep, {}, (), "per_channel", p.rank, p.share)
    w = cm.widths(p8)
    kind = {n: "fp32" if n in ("fc", "layers.2.conv1") else "per_channel" for n in space.layers}  # shared, factorized: float
    expect = sum(lowrank_cost.interp(cm.int8.tables[n], kind[n], *w[n]) * (0.6 if n == "layers.2.conv1" else 1.0)
                 for n in space.layers) / 10.0
    assert cm.int8_table_ratio(p8) == pytest.approx(expect, abs=1e-12)
    assert cm.int8_table_ratio(p8) < cm.int8_table_ratio(Policy(p.keep, {}, ("layers.2.conv1", "fc"), "per_channel"))
    # the timing candidates: one pair per (factorizable layout, share), shaped like the dense layer
    mods, x = dict(model.named_modules()), torch.randn(2, 16, 40)
    layouts = {("k",): (mods["layers.2.conv1"], [8, 16], [8, 16], 2, (40,))}
    pairs, plan = lowrank_cost.pair_candidates(space, {"layers.2.conv1": ("k",)}, layouts, {(2, 16, (40,)): x})
    assert sorted(pairs) == ["0:lowrank0.25", "0:lowrank0.5"] and plan[0][0][2] == "0:16x16"
    assert pairs["0:lowrank0.5"]().shape == mods["layers.2.conv1"](x).shape
    res = {"0:16x16": {"median_ms": 2.0}, "0:lowrank0.25": {"median_ms": 1.0}, "0:lowrank0.5": {"median_ms": 1.5}}
    assert lowrank_cost.pair_factors(res, "median_ms", plan) == {0: {"shares": [0.25, 0.5], "factor": [0.5, 0.75]}}


def test_cost_table_measures_the_pair_factor_per_layer_and_share(trained, task):
    model, _ = trained
    space = _space(model, task)
    cm = build_cost_model(model, space, task, batch_size=16, grid=2, repeats=2)  # small: timing is not the point
    for n, t in cm.tables.items():
        if n in space.shapes:
            assert t["lowrank"]["shares"] == [0.25, 0.5] and all(0 < f < 100 for f in t["lowrank"]["factor"])
        else:
            assert "lowrank" not in t  # the classifier
    p = space.clip(Policy({}, rank={"layers.2.conv1": 0.5}))
    t = cm.tables["layers.2.conv1"]
    extra = t["ms"][-1][-1] * (t["lowrank"]["factor"][1] - 1.0)  # full widths: the table's last entry
    assert cm.latency_ms(p) - cm.latency_ms(Policy()) == pytest.approx(extra, rel=1e-9, abs=1e-12)
    plain = build_space(model, task, step=4)
    assert lowrank_cost.pair_candidates(plain, {}, {}, {}) == ({}, {})  # ranks off: no pair timed, tables as before


def test_optuna_suggests_legal_policies_with_the_new_dimensions(trained, task):
    model, _ = trained
    space = _space(model, task, sparsities=(0.0, 0.5))
    st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ev = types.SimpleNamespace(space=space)
    seen_rank, seen_share = set(), set()
    for _ in range(8):
        trial = st.ask()
        raw = optuna_search.suggest(trial, ev)
        assert {f"rank:{n}" for n in space.shapes} | {f"share:{n}" for n in space.layers} <= set(trial.params)
        assert {f"keep:{r}" for r in space.roots} <= set(trial.params)  # old names unchanged
        p = space.clip(raw)
        assert set(p.rank.values()) <= {0.25, 0.5} and set(p.share.values()) <= {2, 4}
        assert not set(p.rank) & (set(p.share) | set(p.sparsity)) and "fc" not in p.rank
        seen_rank |= set(p.rank.values())
        seen_share |= set(p.share.values())
        assert len(load_recipe({"task": TASK, "model": "rescnn1d", "seed": 0, "stages": to_stages(p, space, None)}).stages) >= 1
        st.tell(trial, 0.0)
    assert seen_rank == {0.25, 0.5} and seen_share == {2, 4}


def test_cli_search_with_ranks_and_share_bits_under_a_size_budget(tmp_path):
    """``torchslim search`` end to end: ``search.ranks`` / ``search.share_bits`` reach the space,
    every trial holds the size budget in stored bytes, and the written recipe (lowrank / share
    stages when chosen) re-runs through ``run_recipe`` to the test metric the search measured."""
    import yaml

    from torchslim.app.runner import run_recipe
    from torchslim.app.search import run_search

    src = {"task": {"name": "mnist1d", "kwargs": {"num_samples": 1200}},
           "model": {"name": "rescnn1d", "kwargs": {"width": 16}}, "seed": 0,
           "train": {"epochs": 1, "lr": 0.003, "max_steps": 20}, "measure": {"batch_size": 64, "threads": 1},
           "search": {"budget": {"size": "0.4x"}, "method": "random", "trials": 4, "step": 4, "ranks": [0.25, 0.5],
                      "share_bits": [3, 5], "finetune": {"max_steps": 2, "epochs": 1}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(src))
    out = tmp_path / "out"
    assert run_search(tmp_path / "s.yaml", out, log=lambda s: None) == 0
    summary = json.loads((out / "search.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    assert summary["space"]["ranks"] == [0.25, 0.5] and summary["space"]["share_bits"] == [3, 5]
    assert all(t["size_ratio"] <= 0.4 + 1e-9 for t in trials if t["feasible"])
    # random proposals use the new dimensions (4 trials, every layer choosing among 3 ranks / 3 widths)
    assert any(t["policy"].get("rank") for t in trials) and any(t["policy"].get("share") for t in trials)
    best = summary["best"]
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    kinds = [next(k for k in s if k != "name") for s in recipe["stages"]]
    assert ("lowrank" in kinds) == bool(best["policy"].get("rank")) and ("share" in kinds) == bool(best["policy"].get("share"))
    run = run_recipe(recipe, tmp_path / "run", log=lambda s: None)
    assert run["rows"][-1]["metric"] == pytest.approx(best["test"], abs=1e-6)

"""Unstructured pruning: exact sparsity, criteria, schedules, mask keeping, recovery, configs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn
from torch.utils.data import DataLoader

from torchslim.core.errors import ConfigError
from torchslim.core.stage import apply_stage
from torchslim.core.train import TrainConfig, fit
from torchslim.pruning.importance import (
    accumulate_grads,
    group_norm,
    score_params,
)
from torchslim.pruning.masks import MaskKeeper, masks_for_sparsity, masks_of, remove
from torchslim.pruning.regrow import RecoveryConfig
from torchslim.pruning.schedule import cubic_sparsity
from torchslim.pruning.sensitivity import allocate, sensitivity
from torchslim.pruning.unstructured import PruneConfig, apply, weight_sparsity
from torchslim.zoo import build_model, build_task


@pytest.fixture(scope="module")
def task():
    return build_task("digits", batch_size=64)


@pytest.fixture(scope="module")
def trained(task):
    torch.manual_seed(0)
    model = build_model("mlp", task, hidden=(32, 16))
    fit(model, task, TrainConfig(epochs=8, lr=3e-3))
    return model


def weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def test_global_magnitude_is_exact_and_matches_torch_prune(trained, task):
    ours = copy.deepcopy(trained)
    res = apply(ours, PruneConfig(sparsity=0.8), task)
    total = sum(p.numel() for p in weights(ours).values())
    zeros = sum(int((p == 0).sum()) for p in weights(ours).values())
    assert zeros == round(0.8 * total)
    assert res.info["sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    assert [r["kept"] for r in res.info["layers"]] == [int(torch.count_nonzero(p)) for p in weights(ours).values()]
    # peer reference: torch.nn.utils.prune.global_unstructured with L1 picks the same weights
    ref = copy.deepcopy(trained)
    mods = [(m, "weight") for m in ref.modules() if isinstance(m, nn.Linear)]
    tprune.global_unstructured(mods, pruning_method=tprune.L1Unstructured, amount=0.8)
    for (m, _), (name, p) in zip(mods, weights(ours).items()):
        assert torch.equal(m.weight_mask.bool(), p != 0), name
    x = task.example_inputs(32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_layer_scope_and_per_layer_are_exact(trained, task):
    model = copy.deepcopy(trained)
    apply(model, PruneConfig(sparsity=0.6, scope="layer"), task)
    for name, p in weights(model).items():
        assert int((p == 0).sum()) == round(0.6 * p.numel()), name
    model = copy.deepcopy(trained)
    per = {"net.1.weight": 0.9, "net.3.weight": 0.5, "net.5.weight": 0.0}
    apply(model, PruneConfig(sparsity=0.5, per_layer=per), task)
    for name, s in per.items():
        p = dict(model.named_parameters())[name]
        assert int((p == 0).sum()) == round(s * p.numel())


def test_criteria_match_hand_computation(trained, task):
    model = copy.deepcopy(trained)
    names = list(weights(model))
    fixed = dataclasses.replace(task, train=DataLoader(task.train.dataset, batch_size=64))  # no shuffling
    grads = accumulate_grads(model, fixed, names, batches=2)
    # reference gradient: autograd of the summed per-batch losses, computed separately
    ref = copy.deepcopy(trained)
    it = iter(fixed.train)
    loss = sum(task.loss(ref(x), y) for x, y in (next(it), next(it)))
    loss.backward()
    for n in names:
        torch.testing.assert_close(grads[n], dict(ref.named_parameters())[n].grad, rtol=1e-4, atol=1e-6)
    tay = score_params(model, names, "taylor", grads=grads)
    w = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(tay[n], (w[n] * grads[n]).abs())
    l2 = score_params(model, names, "l2")
    assert torch.equal(l2[names[0]], w[names[0]].detach() ** 2)
    r1, r2 = score_params(model, names, "random", seed=3), score_params(model, names, "random", seed=3)
    assert torch.equal(r1[names[0]], r2[names[0]])
    g = group_norm(torch.tensor([[3.0, -4.0], [1.0, 0.0]]), p=2)
    assert g.tolist() == [5.0, 1.0]
    assert group_norm(torch.tensor([[3.0, -4.0], [1.0, 0.0]]), p=1, dim=1).tolist() == [4.0, 4.0]


def test_taylor_pruning_keeps_highest_taylor_scores(trained, task):
    model = copy.deepcopy(trained)
    apply(model, PruneConfig(sparsity=0.5, criterion="taylor", batches=2), task)
    assert weight_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    # what was kept is what Taylor importance |w * dL/dw| ranks high (scored here on the dense
    # model over 8 training batches, so not the exact batches the stage used): kept weights
    # score far above pruned ones, and the choice differs from plain magnitude pruning
    masks = masks_of(model)
    scores = score_params(trained, list(masks), "taylor", task, batches=8)
    kept = torch.cat([scores[n][m] for n, m in masks.items()])
    pruned = torch.cat([scores[n][~m] for n, m in masks.items()])
    assert kept.mean() > 5 * pruned.mean(), (kept.mean(), pruned.mean())
    assert torch.quantile(kept, 0.5) > torch.quantile(pruned, 0.9)
    by_magnitude = copy.deepcopy(trained)
    apply(by_magnitude, PruneConfig(sparsity=0.5, criterion="magnitude"), task)
    other = masks_of(by_magnitude)
    assert any(not torch.equal(masks[n], other[n]) for n in masks)


def test_cubic_schedule_closed_form():
    s_i, s_f, t0, n, dt = 0.1, 0.9, 10, 5, 4
    for t in range(40):
        frac = min(max((t - t0) / (n * dt), 0.0), 1.0)
        assert cubic_sparsity(t, s_i, s_f, t0, n, dt) == pytest.approx(s_f + (s_i - s_f) * (1 - frac) ** 3, abs=1e-12)
    assert cubic_sparsity(14, 0.0, 0.9, 10, 5, 4) == pytest.approx(0.9 * (1 - 0.8**3))  # 0.4392
    assert cubic_sparsity(30, 0.0, 0.9, 10, 5, 4) == pytest.approx(0.9)


def test_gradual_pruning_follows_schedule_during_fit(trained, task):
    model = copy.deepcopy(trained)
    cfg = PruneConfig(sparsity=0.9, schedule="gradual", gradual_start=0.1, gradual_end=0.7, gradual_updates=4,
                      finetune=TrainConfig(epochs=3, lr=1e-3))
    res = apply(model, cfg, task)
    steps = 3 * len(task.train)  # 51
    t0, dt = int(0.1 * steps), (int(0.7 * steps) - int(0.1 * steps)) // 4
    log = res.info["schedule_log"]
    assert [e["step"] for e in log] == [t0 + k * dt for k in range(5)]
    for e in log:
        assert e["sparsity"] == pytest.approx(cubic_sparsity(e["step"], 0.0, 0.9, t0, 4, dt))
    total = sum(p.numel() for p in weights(model).values())
    assert sum(int((p == 0).sum()) for p in weights(model).values()) == round(0.9 * total)


def test_iterative_rounds_are_geometric(trained, task):
    model = copy.deepcopy(trained)
    res = apply(model, PruneConfig(sparsity=0.875, schedule="iterative", iterations=3,
                                   finetune=TrainConfig(epochs=1, lr=1e-3)), task)
    assert res.info["round_sparsities"] == pytest.approx([0.5, 0.75, 0.875])
    assert weight_sparsity(model) == pytest.approx(0.875, abs=1e-3)


def test_mask_keeper_keeps_zeros_through_fit(trained, task):
    model = copy.deepcopy(trained)
    apply(model, PruneConfig(sparsity=0.7), task)
    before = {n: p.detach().clone() for n, p in weights(model).items()}
    # Adam with weight decay would move every weight; the keeper must hold the zeros
    fit(model, task, TrainConfig(epochs=2, lr=1e-2, optimizer="AdamW", optimizer_kwargs={"weight_decay": 0.1}),
        hooks=[MaskKeeper()])
    for n, p in weights(model).items():
        assert torch.equal(p == 0, before[n] == 0), n
        assert not torch.equal(p, before[n])
    unkept = copy.deepcopy(model)
    remove(unkept)
    fit(unkept, task, TrainConfig(epochs=1, lr=1e-2))
    # without the keeper most zeros are lost (the check is real); weights fed by always-zero
    # pixels or into dead units get no gradient and stay zero
    assert weight_sparsity(unkept) < 0.4


def test_masks_are_not_in_state_dict_and_remove_bakes(trained, task):
    model = copy.deepcopy(trained)
    apply(model, PruneConfig(sparsity=0.5), task)
    assert set(model.state_dict()) == set(trained.state_dict())
    assert len(masks_of(copy.deepcopy(model))) == 3
    remove(model)
    assert masks_of(model) == {} and weight_sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_masks_only_grow():
    scores = {"a": torch.arange(10.0)}
    first = masks_for_sparsity(scores, 0.3, "layer")
    second = masks_for_sparsity({"a": torch.arange(10.0).flip(0)}, 0.5, "layer", current=first)
    assert (~second["a"] & first["a"]).sum() == 2 and (first["a"] | ~second["a"]).all()


def test_l1_schedule_then_threshold(task):
    torch.manual_seed(1)
    model = build_model("mlp", task, hidden=(32,))
    apply(model, PruneConfig(sparsity=0.7, schedule="l1", finetune=TrainConfig(epochs=2, lr=3e-3, l1=1e-4)), task)
    assert weight_sparsity(model) == pytest.approx(0.7, abs=1e-3)
    model2 = build_model("mlp", task, hidden=(32,))
    apply(model2, PruneConfig(schedule="l1", threshold=0.05, finetune=TrainConfig(epochs=1, l1=1e-4)), task)
    assert all(((p == 0) | (p.abs() >= 0.05)).all() for p in weights(model2).values())


def test_greedy_and_random_regrowth(trained, task):
    base = copy.deepcopy(trained)
    originals = {n: p.detach().clone() for n, p in weights(base).items()}
    greedy = copy.deepcopy(trained)
    rec = RecoveryConfig(method="greedy", budget=0.02, chunk=40, max_rounds=3, min_metric=1.01)
    res = apply(greedy, PruneConfig(sparsity=0.95, recovery=rec), task).info["recovery"]
    h = res["history"]
    assert res["regrown"] > 0 and res["regrown"] <= int(0.02 * round(0.95 * sum(p.numel() for p in originals.values())))
    # each accepted chunk lowered the validation loss, so the final loss is below the pruned one
    from torchslim.pruning.regrow import val_loss
    pruned = copy.deepcopy(trained)
    apply(pruned, PruneConfig(sparsity=0.95), task)
    assert val_loss(greedy, task) < val_loss(pruned, task)
    for n, p in weights(greedy).items():  # regrown weights are restored to their dense values
        nz = p != 0
        torch.testing.assert_close(p[nz], originals[n][nz])
    assert h[-1]["sparsity"] < h[0]["sparsity"]
    rnd = copy.deepcopy(trained)
    rres = apply(rnd, PruneConfig(sparsity=0.95, recovery=RecoveryConfig(method="random", chunk=25, max_rounds=2)), task)
    total = sum(p.numel() for p in originals.values())
    assert total - sum(int(torch.count_nonzero(p)) for p in weights(rnd).values()) == round(0.95 * total) - 50
    assert rres.info["recovery"]["regrown"] == 50


def test_recovery_stops_at_bound(trained, task):
    model = copy.deepcopy(trained)
    rec = RecoveryConfig(method="random", min_metric=0.0, chunk=10)
    res = apply(model, PruneConfig(sparsity=0.5, recovery=rec), task).info["recovery"]
    assert res["regrown"] == 0 and res["bound_met"]


def test_sensitivity_and_allocation(trained, task):
    model = copy.deepcopy(trained)
    state = copy.deepcopy(model.state_dict())
    table = sensitivity(model, task, sparsities=(0.5, 0.9))
    assert len(table) == 6 and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    row = next(r for r in table if r["layer"] == "net.1.weight" and r["sparsity"] == 0.9)
    ref = copy.deepcopy(model)
    apply(ref, PruneConfig(sparsity=0.9, layers=["net.1"]), task)
    assert row["metric"] == pytest.approx(task.evaluate(ref, "val"))
    alloc = allocate(table, 0.7)
    numel = {r["layer"]: r["numel"] for r in table}
    assert sum(alloc[k] * numel[k] for k in alloc) / sum(numel.values()) == pytest.approx(0.7, abs=1e-6)
    assert all(0 <= v <= 0.9 + 1e-9 for v in alloc.values())
    # the allocation drives a gradual run; each layer ends at exactly its own sparsity
    apply(model, PruneConfig(sparsity=0.7, per_layer=alloc, schedule="gradual", finetune=TrainConfig(epochs=1)), task)
    for name, s in alloc.items():
        assert int((dict(model.named_parameters())[name] == 0).sum()) == round(s * numel[name])
    synthetic = [{"layer": "a", "numel": 100, "sparsity": 0.9, "drop": 0.5},
                 {"layer": "b", "numel": 100, "sparsity": 0.9, "drop": 0.01}]
    alloc = allocate(synthetic, 0.5)
    assert alloc["b"] > alloc["a"]  # the insensitive layer takes more of the sparsity
    with pytest.raises(ConfigError):
        allocate(synthetic, 0.95)


def test_layer_importance_bypass(trained, task):
    from torchslim.pruning.layers import LayerDropConfig, layer_importance

    imp = layer_importance(trained, ["net.2"], LayerDropConfig(count=1, criterion="metric", split="val"), task)
    assert imp["net.2"] == pytest.approx(task.evaluate(trained, "val") - task.evaluate(
        nn.Sequential(*[m for i, m in enumerate(trained.net) if i != 2]), "val"))


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.head.weight = self.emb.weight  # tied
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.custom = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.head(self.emb(x[:, :8])) @ self.custom
        h, _ = self.rnn(h.unsqueeze(1))
        return self.fc(h[:, 0])


def test_unhandled_layers_are_named_and_rest_is_pruned(task):
    model = Odd()
    with pytest.warns(UserWarning, match=r"<root> \(Odd: not in layers.types\), emb \(tied weight\), head \(tied weight\), rnn \(GRU"):
        res = apply(model, PruneConfig(sparsity=0.5), task)
    assert [r["layer"] for r in res.info["layers"]] == ["fc.weight"]
    assert res.info["layers"][0]["sparsity"] == pytest.approx(0.5)
    assert any("tied" in s for s in res.info["skipped"]) and any("GRU" in s for s in res.info["skipped"])
    assert model(task.example_inputs(4)).shape == (4, 10)  # still runs


@pytest.mark.parametrize("kwargs, field", [
    ({"sparsity": 1.0}, "PruneConfig.sparsity"),
    ({"sparsity": -0.1}, "PruneConfig.sparsity"),
    ({"criterion": "bogus"}, "PruneConfig.criterion"),
    ({"scope": "everything"}, "PruneConfig.scope"),
    ({"schedule": "gradual"}, "PruneConfig.finetune"),
    ({"schedule": "l1", "finetune": TrainConfig(epochs=1)}, "PruneConfig.finetune"),
    ({"layers": {"types": ()}}, "PruneConfig.layers.types"),
    ({"layers": {"include": []}}, "PruneConfig.layers.include"),
    # old names are refused in one line naming the new key (issue 11)
    ({"layer_types": ("Linear",)}, "PruneConfig.layer_types: renamed — write layers: {types: [...]}"),
    ({"include": ("net.*",)}, "PruneConfig.include: renamed — write layers: {include: [...]}"),
    ({"taylor_batches": 2}, "PruneConfig.taylor_batches: renamed — write batches"),
])
def test_bad_configs_fail_on_construction(kwargs, field):
    with pytest.raises(ConfigError) as err:
        PruneConfig(**kwargs)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_empty_selection_fails_before_work(trained, task):
    model = copy.deepcopy(trained)
    with pytest.raises(ConfigError) as err:
        apply(model, PruneConfig(layers={"include": ["nothing*"]}), task)
    assert "no layer selected" in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters()))
    with pytest.raises(ConfigError, match="per_layer"):
        apply(model, PruneConfig(per_layer={"nope": 0.5}), task)


def test_stage_registry_dispatches(trained, task):
    res = apply_stage(copy.deepcopy(trained), PruneConfig(sparsity=0.3), task)
    assert weight_sparsity(res.model) == pytest.approx(0.3, abs=1e-3) and res.save is not None


def test_bare_layer_as_model(task):
    torch.manual_seed(0)
    layer = nn.Linear(64, 10)
    res = apply(layer, PruneConfig(sparsity=0.25), task)
    assert res.info["layers"][0]["layer"] == "weight" and int((layer.weight == 0).sum()) == 160


def test_finetune_recovery_keeps_sparsity_and_recovers(trained, task):
    pruned = copy.deepcopy(trained)
    apply(pruned, PruneConfig(sparsity=0.9), task)
    model = copy.deepcopy(trained)
    rec = RecoveryConfig(method="finetune", finetune=TrainConfig(epochs=3, lr=3e-3))
    res = apply(model, PruneConfig(sparsity=0.9, recovery=rec), task)
    assert weight_sparsity(model) == pytest.approx(0.9, abs=1e-3)
    assert res.info["recovery"]["val_metric"] > task.evaluate(pruned, "val")
    with pytest.raises(ConfigError, match="RecoveryConfig.finetune"):
        RecoveryConfig(method="finetune")


def test_per_layer_with_zero_sparsity_is_refused():
    """Schedules scale per_layer by (sparsity now / sparsity): sparsity 0 pruned nothing, silently."""
    with pytest.raises(ConfigError, match=r"PruneConfig.sparsity: must be > 0 with per_layer"):
        PruneConfig(sparsity=0.0, per_layer={"net.1": 0.5})
    assert PruneConfig(sparsity=0.0).sparsity == 0.0  # alone, 0 stays a valid (no-op) target

"""Compression survives later training (issue 11, point 4): a model compressed one way, then
given to every later stage that trains, keeps what the first stage bought — pruned zeros stay
zero, shared weights keep at most 2**bits values, structured shapes do not grow back.

Every pair runs through the stage registry (as a recipe does) on a small MLP on digits with a
few optimizer steps (enough to move any weight a hook fails to hold: lr 1e-2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim import (
    DistillConfig,
    LowRankConfig,
    NMConfig,
    PruneConfig,
    QuantConfig,
    ShareConfig,
    StructuredPruneConfig,
    TrainConfig,
    apply_stage,
)
from torchslim.core.errors import ConfigError
from torchslim.dynamic import ExitConfig
from torchslim.pruning import LayerDropConfig
from torchslim.pruning.masks import masks_of
from torchslim.zoo import build_model, build_task

STEPS = TrainConfig(epochs=1, max_steps=4, lr=1e-2, optimizer="SGD", seed=0)
FIRST = {
    "prune": lambda: PruneConfig(sparsity=0.6),
    "nm": lambda: NMConfig(),
    "share": lambda: ShareConfig(bits=3),
    "structured": lambda: StructuredPruneConfig(macs_keep=0.6),
}
LATER = {
    "train": lambda teacher: STEPS,
    "qat": lambda teacher: QuantConfig(mode="weights_only", finetune=TrainConfig(epochs=100, max_steps=4, lr=1e-2)),
    "share": lambda teacher: ShareConfig(bits=4, finetune=STEPS),
    "distill": lambda teacher: DistillConfig(teacher=teacher, finetune=STEPS),
    "lowrank": lambda teacher: LowRankConfig(params_keep=0.5, min_saved_macs=0, finetune=STEPS),
    "structured": lambda teacher: StructuredPruneConfig(macs_keep=0.8, finetune=STEPS),
    "prune": lambda teacher: PruneConfig(sparsity=0.3, finetune=STEPS),
}


@pytest.fixture(scope="module")
def base():
    task = build_task("digits", batch_size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", task, hidden=(64, 64))
    from torchslim import fit

    fit(model, task, TrainConfig(epochs=2, lr=3e-3, seed=0))
    return model, task


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights as the model computes them (shared / fake-quant wrappers see through)."""
    out = {}
    for name, m in model.named_modules():
        inner = getattr(m, "layer", None)  # a FakeQuantLayer holds the float layer
        if isinstance(inner, nn.Linear):
            out[name] = inner.weight.detach().clone()
        elif isinstance(m, nn.Linear) and not name.endswith(".layer"):
            out[name] = m.weight.detach().clone()
    return out


# pairs refused before any work, in one line naming the order that works
REFUSED = {("share", "structured"): "run structured pruning before weight sharing",
           ("share", "prune"): "prune before weight sharing"}


@pytest.mark.parametrize("later", list(LATER))
@pytest.mark.parametrize("first", list(FIRST))
def test_compression_survives_later_training(base, first, later):
    if first == "structured" and later == "structured":
        pytest.skip("structured twice is one structured stage with a smaller target")
    model, task = copy.deepcopy(base[0]), base[1]
    teacher = copy.deepcopy(base[0]).eval()
    model = apply_stage(model, FIRST[first](), task).model
    before = _weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    zeros = {n: w == 0 for n, w in before.items()}
    if (first, later) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(first, later)]):
            apply_stage(model, LATER[later](teacher), task)
        assert all(torch.equal(before[n], w) for n, w in _weights(model).items())  # untouched
        return
    out = apply_stage(model, LATER[later](teacher), task).model
    after = _weights(out)
    kept = {n for n in before if n in after and after[n].shape == before[n].shape}
    if first in ("prune", "nm"):
        assert kept or later in ("structured", "lowrank")
        for n in kept:
            moved = int((after[n][zeros[n]] != 0).sum())
            assert moved == 0, f"{first} then {later}: {moved} pruned weights of {n} moved off zero"
        if later == "structured":  # the masks were carried through the removal and held
            masks = masks_of(out)
            assert masks, f"{first} then structured: the pruning masks were dropped"
            params = dict(out.named_parameters())
            for n, m in masks.items():
                moved = int((params[n].detach()[~m.bool()] != 0).sum())
                assert moved == 0, f"{first} then structured: {moved} masked weights of {n} moved off zero"
    if first == "share":
        for n in kept:
            distinct = after[n].unique().numel()
            assert distinct <= 2**4 + 1 if later == "share" else distinct <= 2**3 + 1, \
                f"share then {later}: {n} holds {distinct} distinct values"
    if first == "structured":
        assert sum(p.numel() for p in out.parameters()) <= n_params * 1.01 or later in ("qat",), \
            f"structured then {later}: the model grew back"


def test_share_of_some_layers_keeps_the_zeros_of_the_pruned_others(base):
    model, task = copy.deepcopy(base[0]), base[1]
    pruned = apply_stage(model, PruneConfig(sparsity=0.6), task).model
    zeros = {n: w == 0 for n, w in _weights(pruned).items()}
    names = sorted(zeros)
    shared = apply_stage(pruned, ShareConfig(bits=4, layers=(names[0],), finetune=STEPS), task).model
    after = _weights(shared)
    for n in names[1:]:  # not shared: only the pruning masks hold these
        assert int((after[n][zeros[n]] != 0).sum()) == 0, f"{n}: pruned weights moved off zero in share's fine-tune"


def test_one_in_place_rule(base):
    """A compression stage returns a new model and leaves its input as it was; a train stage
    updates the model in place (as torch.optim does)."""
    model, task = copy.deepcopy(base[0]), base[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cfg in (PruneConfig(sparsity=0.5), NMConfig(), ShareConfig(bits=3), StructuredPruneConfig(macs_keep=0.6),
                LowRankConfig(params_keep=0.5, min_saved_macs=0), QuantConfig(mode="weights_only"),
                DistillConfig(teacher=copy.deepcopy(model), finetune=STEPS), LayerDropConfig(count=1),
                ExitConfig(layers=["net.2"], finetune=STEPS)):
        out = apply_stage(model, cfg, task).model
        assert out is not model, type(cfg).__name__
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), type(cfg).__name__
        assert set(before) == set(model.state_dict()), type(cfg).__name__
    assert apply_stage(model, STEPS, task).model is model
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plain_fit_keeps_pruned_zeros_without_being_told(base):
    """fit applies the hooks of every compression present itself (no caller passes them)."""
    from torchslim import fit

    model, task = copy.deepcopy(base[0]), base[1]
    pruned = apply_stage(model, PruneConfig(sparsity=0.6), task).model
    zeros = {n: w == 0 for n, w in _weights(pruned).items()}
    fit(pruned, task, STEPS)  # no hooks given
    after = _weights(pruned)
    assert all(int((after[n][zeros[n]] != 0).sum()) == 0 for n in zeros)
    assert any(not torch.equal(after[n], base_w) for n, base_w in _weights(base[0]).items())

"""Low-rank factorization: Eckart–Young closed form, MACs, convs, skipping, fine-tune, configs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim.core.errors import ConfigError
from torchslim.core.stage import apply_stage
from torchslim.core.train import TrainConfig, fit
from torchslim.lowrank import LowRankConfig, factorize_layers, rank_for_energy
from torchslim.zoo import build_model, build_task


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward counted by PyTorch's own flop counter (2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


def test_linear_half_macs_error_equals_tail_energy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128))
    w = model[0].weight.detach().double().clone()
    dense = copy.deepcopy(model)
    recs = factorize_layers(model, LowRankConfig(min_saved_macs=0, params_keep=0.5), torch.randn(2, 96))
    r = recs[0]["rank"]
    assert r == (96 * 128 // 2) // (96 + 128) == 27
    sigma = np.linalg.svd(w.numpy(), compute_uv=False)  # peer library for the singular values
    tail = float(np.sum(sigma[r:] ** 2))
    # Weight error: Eckart–Young, ||W - W_r||_F^2 = sum_{i>r} sigma_i^2.
    w_r = (model[0][1].weight @ model[0][0].weight).detach().double()
    assert torch.linalg.matrix_norm(w - w_r).item() ** 2 == pytest.approx(tail, rel=1e-4)
    assert recs[0]["rel_fro_error"] == pytest.approx(np.sqrt(tail / np.sum(sigma**2)), rel=1e-6)
    # Output error on the basis inputs e_i is exactly the weight error (the bias cancels).
    eye = torch.eye(96)
    err = (dense(eye) - model(eye)).double()
    assert (err**2).sum().item() == pytest.approx(tail, rel=1e-4)
    # On any batch X: ||X (W - W_r)^T||_F <= ||X||_2 ||W - W_r||_F.
    x = torch.randn(64, 96)
    err = (dense(x) - model(x)).double()
    bound = torch.linalg.matrix_norm(x.double(), ord=2).item() * np.sqrt(tail)
    assert torch.linalg.matrix_norm(err).item() <= bound * (1 + 1e-5)
    # Really fewer MACs, as counted by torch.utils.flop_counter and as recorded.
    assert macs(dense, x[:1]) == 96 * 128 == recs[0]["macs_before"]
    assert macs(model, x[:1]) == r * (96 + 128) == recs[0]["macs_after"]
    assert recs[0]["macs_after"] <= 0.5 * recs[0]["macs_before"]


@pytest.mark.parametrize("conv,shape", [(nn.Conv2d, (2, 6, 9, 9)), (nn.Conv1d, (2, 6, 17))])
def test_conv_full_rank_exact_and_truncated_closed_form(conv, shape):
    torch.manual_seed(1)
    layer = conv(6, 16, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(*shape)
    k = layer.weight[0].numel()  # 6*3*3 or 6*3
    # A weight of exact rank 4 is reproduced exactly by the two convs (same outputs).
    exact = copy.deepcopy(layer)
    with torch.no_grad():
        exact.weight.copy_((torch.randn(16, 4) @ torch.randn(4, k)).reshape(exact.weight.shape))
    two = nn.Sequential(copy.deepcopy(exact))
    factorize_layers(two, LowRankConfig(min_saved_macs=0, rank=4), x)
    assert isinstance(two[0], nn.Sequential) and two[0][1].kernel_size == (1,) * (len(shape) - 2)
    torch.testing.assert_close(two(x), exact(x), atol=1e-4, rtol=1e-4)
    # Rank 4: the reshaped-weight error is the SVD tail energy.
    low = nn.Sequential(copy.deepcopy(layer))
    rec = factorize_layers(low, LowRankConfig(min_saved_macs=0, rank=4, min_mac_saving=0.0), x)[0]
    a, b = low[0][0].weight.detach(), low[0][1].weight.detach()
    w_r = b.reshape(16, 4) @ a.reshape(4, k)
    s = torch.linalg.svdvals(layer.weight.detach().reshape(16, k).double())
    err = torch.linalg.matrix_norm(layer.weight.detach().reshape(16, k).double() - w_r.double()).item()
    assert err**2 == pytest.approx(s[4:].pow(2).sum().item(), rel=1e-4)
    positions = layer(x).shape[2:].numel()
    assert rec["macs_before"] == positions * 16 * k and rec["macs_after"] == positions * 4 * (16 + k)
    assert macs(low, x[:1]) == rec["macs_after"] < macs(nn.Sequential(layer), x[:1]) == rec["macs_before"]


def test_only_applied_where_macs_drop_and_energy_rank():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    before = copy.deepcopy(model.state_dict())
    recs = factorize_layers(model, LowRankConfig(min_saved_macs=0, energy=1.0), torch.randn(2, 32))
    assert [r["applied"] for r in recs] == [False, False]  # full rank never saves MACs
    assert all("reason" in r for r in recs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.9) == 2  # 13/14 = 0.93 >= 0.9 > 9/14
    assert rank_for_energy(s, 1.0) == 3


def test_mlp_on_digits_half_macs_layer_within_one_point_after_finetune():
    task = build_task("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", task, hidden=(128,))
    fit(model, task, TrainConfig(epochs=12, lr=2e-3, seed=0))
    dense_acc = task.evaluate(model)
    assert dense_acc > 0.93
    # the accuracy of the factorization is under test, not its speed (min_saved_macs 0: at this
    # size the pair is not worth it in eager; the speed tests below cover that rule)
    cfg = LowRankConfig(params_keep=0.5, layers=["net.1"], min_saved_macs=0, finetune=TrainConfig(epochs=2, lr=1e-4, seed=0))
    res = apply_stage(model, cfg, task)  # through the stage registry
    rec = res.info["layers"][0]
    assert rec["applied"] and rec["macs_after"] <= 0.5 * rec["macs_before"]
    x = task.example_inputs(1)
    assert macs(res.model, x) == res.info["macs_after"] + 128 * 10  # the untouched classifier
    # 360 test images: 1 pt is ~4 images
    assert res.info["metric_factorized"] >= dense_acc - 0.01, (dense_acc, res.info)
    assert res.info["metric_after"] >= dense_acc - 0.01, (dense_acc, res.info)


@pytest.mark.parametrize("kwargs,field", [
    ({"energy": 0.0}, "LowRankConfig.energy"),
    ({"params_keep": 1.5}, "LowRankConfig.params_keep"),
    ({"rank": 0}, "LowRankConfig.rank"),
    ({"energy": 0.9, "params_keep": 0.5}, "LowRankConfig"),
    ({}, "LowRankConfig"),
    ({"params_keep": 0.5, "min_mac_saving": 1.0}, "LowRankConfig.min_mac_saving"),
])
def test_bad_configs_one_line(kwargs, field):
    with pytest.raises(ConfigError) as e:
        LowRankConfig(min_saved_macs=0, **kwargs)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_rank_larger_than_layer_and_unknown_layer_fail_before_work():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"^LowRankConfig.rank: rank 9 is larger than layer '0' allows \(weight 64x8: at most 8\)$"):
        factorize_layers(model, LowRankConfig(min_saved_macs=0, rank=9, layers=["0"]), torch.randn(1, 8))
    with pytest.raises(ConfigError, match="^LowRankConfig.layers: model has no module 'fc9'$"):
        factorize_layers(model, LowRankConfig(min_saved_macs=0, rank=2, layers=["fc9"]), torch.randn(1, 8))
    with pytest.raises(ConfigError, match="only Linear and Conv"):
        factorize_layers(model, LowRankConfig(min_saved_macs=0, rank=2, layers=["1"]), torch.randn(1, 8))
    with pytest.raises(ConfigError, match="rank 5 is larger"):
        factorize_layers(model, LowRankConfig(min_saved_macs=0, rank={"0": 2, "2": 5}), torch.randn(1, 8))
    assert isinstance(model[0], nn.Linear)  # nothing was changed by the failed calls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_per_layer_ranks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    recs = factorize_layers(model, LowRankConfig(min_saved_macs=0, rank={"2": 8}), torch.randn(1, 64))
    assert [(r["layer"], r["rank"], r["applied"]) for r in recs] == [("2", 8, True)]
    assert isinstance(model[0], nn.Linear) and model[2][0].out_features == 8
    with pytest.raises(ConfigError, match=r"^LowRankConfig.rank: no rank given for layer \['0'\]"):
        factorize_layers(model, LowRankConfig(min_saved_macs=0, rank={"2": 8}, layers=["0"]), torch.randn(1, 64))


def _tiny_task(model_in: int, n: int = 64):
    from torch.utils.data import DataLoader, TensorDataset

    from torchslim import Task

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, model_in, generator=g), torch.randint(0, 4, (n,), generator=g))
    return Task(name="tiny", test=DataLoader(data, batch_size=32), num_classes=4)


def test_speed_check_keeps_a_pair_that_is_really_faster():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 4))
    res = apply_stage(model, LowRankConfig(rank=32, layers=["0"], speed_batch=64, speed_check=True), _tiny_task(2048))
    rec = res.info["layers"][0]
    assert rec["applied"], rec  # 2048x2048 at rank 32: 3% of the MACs, several times faster
    assert isinstance(res.model[0], nn.Sequential)


def test_speed_check_reverts_a_pair_measured_slower(monkeypatch):
    from torchslim import lowrank

    seen = []

    def slower(original, pair, x, margin):
        seen.append((type(original).__name__, tuple(x.shape), margin))
        return False, "measured 9 us for the pair vs 5 us for the layer"

    monkeypatch.setattr(lowrank, "is_faster", slower)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    ref = copy.deepcopy(model)
    res = apply_stage(model, LowRankConfig(params_keep=0.3, layers=["0"], speed_batch=32, speed_check=True, min_saved_macs=0), _tiny_task(64))
    rec = res.info["layers"][0]
    assert seen == [("Linear", (32, 64), 0.05)]  # timed on the input the layer sees in a real batch
    assert not rec["applied"] and rec["reason"].startswith("not faster: measured 9 us")
    assert rec["macs_after"] == rec["macs_before"] and isinstance(res.model[0], nn.Linear)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), res.model.state_dict().values()))


def test_small_layers_are_kept_whole_by_the_mac_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    res = apply_stage(model, LowRankConfig(params_keep=0.3, layers=["0"]), _tiny_task(64))
    rec = res.info["layers"][0]
    # rank floor(0.3*64*64/128) = 9: saves 64*64 - 9*128 = 2,944 MACs per sample, x32 = 94,208
    assert rec["rank"] == 9 and not rec["applied"]
    assert rec["reason"] == "saves 94,208 MACs per call at batch 32 < min_saved_macs 2,000,000"
    assert isinstance(res.model[0], nn.Linear)
    big = apply_stage(copy.deepcopy(model), LowRankConfig(params_keep=0.3, layers=["0"], speed_batch=1024), _tiny_task(64))
    assert big.info["layers"][0]["applied"]  # 2,944 x 1024 = 3.0M >= 2M

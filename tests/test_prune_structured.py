"""Structured pruning: exact surgery (pruned == masked), MAC targets, unsupported layers, configs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.errors import ConfigError
from torchslim.core.task import Task
from torchslim.core.train import TrainConfig
from torchslim.pruning import graph
from torchslim.pruning.structured import (
    StructuredPruneConfig,
    apply,
    channel_scores,
    count_macs,
    layer_macs,
    make_plan,
)
from torchslim.zoo.models import lenet300, rescnn1d


def _task(in_dim: int, classes: int = 10, n: int = 64) -> Task:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, in_dim, generator=g), torch.randint(0, classes, (n,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    return Task("toy", test=dl, train=dl, val=dl, num_classes=classes, input_shape=(in_dim,))


def _random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine, so a wrongly handled BN shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _plan(model: nn.Module, task: Task, cfg: StructuredPruneConfig, share: float):
    x = task.example_inputs(1)
    groups, _ = graph.safe_groups(model, graph.build_graph(model, x), [graph.classifier_layer(model, x)])
    return make_plan(channel_scores(model, groups, cfg, task), share, cfg), groups


@pytest.mark.parametrize("builder,in_dim", [(lambda: rescnn1d((40,), width=16), 40), (lambda: lenet300((64,)), 64)])
def test_pruned_equals_masked(builder, in_dim):
    """Physical removal == zeroing the same channels (weights, bias, BN affine) in the dense model."""
    torch.manual_seed(0)
    model, task = _random_bn(builder()), _task(in_dim)
    plan, groups = _plan(model, task, StructuredPruneConfig(criterion="l1"), 0.4)
    assert all(len(v) > 0 for v in plan.values()) and len(plan) == len(groups)
    x = torch.randn(32, in_dim)
    pruned = graph.prune_plan(copy.deepcopy(model), plan, x[:1]).eval()
    masked = graph.mask_plan(copy.deepcopy(model), plan, x[:1]).eval()
    with torch.no_grad():
        a, b, dense = pruned(x), masked(x), model(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert (a - dense).abs().max() > 1e-2  # masking really changed something (the test has teeth)
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())


def test_rescnn_half_macs_really_smaller():
    torch.manual_seed(0)
    model, task = _random_bn(rescnn1d((40,), width=24)), _task(40)
    res = apply(model, StructuredPruneConfig(macs_keep=0.5, criterion="l2"), task)
    info, pruned = res.info, res.model
    x = task.example_inputs(1)
    assert 0.42 <= info["macs_ratio"] <= 0.5
    assert count_macs(pruned, x) == info["macs_after"] and count_macs(model, x) == info["macs_before"]
    assert pruned.fc.out_features == 10  # the classifier's outputs are never pruned
    # every residual path agrees: stem, block outputs, shortcut and fc input have one width
    widths = {pruned.stem[0].out_channels, pruned.layers[0].conv2.out_channels, pruned.fc.in_features}
    assert len(widths) == 1 and widths.pop() < 24
    for name, rec in info["layers"].items():  # the record matches the real tensors
        mod = pruned.get_submodule(name)
        assert rec["out_after"] == (mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels)
    assert sum(info["layers"][n]["macs_after"] for n in info["layers"]) == sum(layer_macs(pruned, x).values())
    assert pruned(torch.randn(5, 40)).shape == (5, 10)
    assert model.stem[0].out_channels == 24  # the input model is untouched


def test_channel_keep_linear_neurons_and_finetune():
    task = _task(64)
    res = apply(lenet300((64,)), StructuredPruneConfig(macs_keep=None, channel_keep=0.5, steps=2,
                                                       finetune=TrainConfig(epochs=1, max_steps=2, device="cpu")), task)
    net = res.model.net
    assert (net[1].out_features, net[3].out_features, net[5].out_features) == (150, 50, 10)
    assert len(res.info["steps"]) == 2 and "finetune" in res.info["steps"][0]


@pytest.mark.parametrize("criterion,allocation", [("l1", "global"), ("bn_scale", "uniform"), ("taylor", "global"),
                                                  ("random", "uniform")])
def test_criteria_and_allocations_hit_target(criterion, allocation):
    model, task = _random_bn(rescnn1d((40,), width=16, blocks=1)), _task(40)
    res = apply(model, StructuredPruneConfig(macs_keep=0.6, criterion=criterion, allocation=allocation), task)
    assert 0.5 <= res.info["macs_ratio"] <= 0.6


def test_ignore_keeps_layer_and_rounding():
    model, task = rescnn1d((40,), width=32, blocks=1), _task(40)
    res = apply(model, StructuredPruneConfig(macs_keep=0.5, layers={"exclude": ["layers.0.conv1"]}, round_to=8), task)
    assert res.model.layers[0].conv1.out_channels == 32
    assert all(rec["out_after"] % 8 == 0 or rec["out_after"] == 10 for rec in res.info["layers"].values())


class _Odd(nn.Module):
    """A custom op with its own parameter (x @ w): the graph library cannot resize it safely."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return x @ self.w


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.odd, self.b, self.d = nn.Linear(8, 16), _Odd(), nn.Linear(16, 16), nn.Linear(16, 16)
        self.d.weight = self.b.weight  # tied
        self.lstm = nn.LSTM(16, 12, batch_first=True)
        self.c, self.f, self.g, self.e = nn.Linear(12, 16), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.d(torch.relu(self.b(self.odd(torch.relu(self.a(x)))))))
        y, _ = self.lstm(h.unsqueeze(1))
        h = torch.relu(self.c(y[:, -1]))
        return self.e(h + self.g(torch.relu(self.f(h))))


def test_unsupported_layers_skipped_with_warning():
    torch.manual_seed(0)
    model, task = _Mixed(), _task(8, classes=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = apply(model, StructuredPruneConfig(macs_keep=None, channel_keep=0.5), task)
    msg = " ".join(str(w.message) for w in caught)
    for name in ("odd", "lstm", "a", "b", "d"):
        assert f"{name} (" in msg
    m = res.model
    assert (m.a.out_features, m.b.out_features, m.d.out_features, m.lstm.hidden_size) == (16, 16, 16, 12)
    assert m.d.weight is m.b.weight  # the tie survives
    assert (m.c.out_features, m.f.out_features, m.e.out_features) == (8, 16, 4)
    assert m(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize("kwargs,field", [
    ({"macs_keep": 1.5}, "macs_keep"), ({"macs_keep": 0.0}, "macs_keep"),
    ({"macs_keep": 0.5, "channel_keep": 0.5}, "macs_keep"), ({"criterion": "fancy"}, "criterion"),
    ({"steps": 0}, "steps"), ({"allocation": "x"}, "allocation"), ({"round_to": 0}, "round_to"),
])
def test_bad_configs_fail_fast(kwargs, field):
    with pytest.raises(ConfigError, match=f"StructuredPruneConfig.{field}") as exc:
        StructuredPruneConfig(**kwargs)
    assert "\n" not in str(exc.value)


def test_bad_selection_fails_before_work():
    task = _task(64)
    with pytest.raises(ConfigError, match=r"^StructuredPruneConfig.layers.exclude: no module matches \['net.99'\]"):
        apply(lenet300((64,)), StructuredPruneConfig(layers={"exclude": ["net.99"]}), task)
    with pytest.raises(ConfigError, match=r"^StructuredPruneConfig.ignore: renamed — write layers: \{exclude: \[...\]\}"):
        StructuredPruneConfig(ignore=("net.1",))
    with pytest.raises(ConfigError, match="no prunable layer"):
        apply(lenet300((64,)), StructuredPruneConfig(layers={"exclude": ["net.1", "net.3"]}), task)

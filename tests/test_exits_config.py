"""ExitConfig validation and backbones early exits must refuse (ConfigError, never a traceback);
exits on nn.TransformerEncoder layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.errors import ConfigError
from torchslim.core.task import Task
from torchslim.dynamic import ExitConfig, early_exit, to_torchscript
from torchslim.dynamic.exits import build
from torchslim.dynamic.policy import simulate
from torchslim.dynamic.split import split


@pytest.mark.parametrize("kwargs,field", [
    ({"accuracy_drop": 1.5}, "accuracy_drop"), ({"accuracy_drop": float("nan")}, "accuracy_drop"),
    ({"latency_budget": 0.0}, "latency_budget"), ({"latency_budget": 2}, "latency_budget"),
    ({"policy": "margin"}, "policy"), ({"mode": "both"}, "mode"), ({"layers": {"include": []}}, "layers.include"),
    ({"include": ["layers.*"]}, "include: renamed — write layers: {include: \\[...\\]}"),
    ({"layers": {"types": ["Linear"]}}, "layers: exits are placed by block name only"), ({"head_weight": -1}, "head_weight"), ({"head_weight": 1e9}, "head_weight"),
    ({"temperature": 0}, "temperature"), ({"alpha": 1.2}, "alpha"), ({"head_hidden": -1}, "head_hidden"),
    ({"head_hidden": 10**9}, "head_hidden"), ({"head_bins": 0}, "head_bins"), ({"head_bins": 1000}, "head_bins"), ({"seed": -1}, "seed"), ({"finetune": "yes"}, "finetune"),
])
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"ExitConfig.{field}"):
        ExitConfig(**kwargs)


def _task(x, y, val=True):
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    return Task(name="synthetic", train=dl, val=dl if val else None, test=dl, num_classes=int(y.max()) + 1)


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.layers(x)
        return -self.layers(x)


class SkipAround(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.layers(x) + x)  # x crosses every cut inside layers


def test_refuses_untraceable_backbone():
    task = _task(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    with pytest.raises(ConfigError, match="cannot split Dynamic"):
        early_exit(Dynamic(), ExitConfig(finetune=None), task)


def test_refuses_cut_inside_skip_connection():
    with pytest.raises(ConfigError, match="cross the cut"):
        split(SkipAround(), ("layers.*",), ())


def test_refuses_no_match_and_no_val():
    task = _task(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="ExitConfig.layers.include: no block"):
        early_exit(model, ExitConfig(layers=["nothing*"], finetune=None), task)
    with pytest.raises(ConfigError, match="no val split"):
        early_exit(model, ExitConfig(finetune=None), _task(torch.randn(64, 8), torch.randint(0, 3, (64,)), val=False))


class Encoder(nn.Module):
    def __init__(self, d=16, classes=3, layers=3):
        super().__init__()
        self.proj = nn.Linear(4, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d, classes)

    def forward(self, x):
        return self.fc(self.encoder(self.proj(x)).mean(dim=1))


def test_transformer_encoder_exits():
    torch.manual_seed(0)
    x = torch.randn(96, 5, 4)
    y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0.5).long()
    task = _task(x, y)
    model = Encoder().eval()
    with torch.no_grad():
        ref = model(x)
    ee = build(model, ExitConfig(layers=["encoder.layers.*"], finetune=None), task).eval()
    assert ee.cut_names == ["encoder.layers.0", "encoder.layers.1"]
    with torch.no_grad():
        torch.testing.assert_close(ee(x), ref, rtol=1e-5, atol=1e-5)  # never exiting = the original model
        ee.thresholds.fill_(0.4)
        dense = ee.all_logits(x)
        out, where = ee.forward_with_exits(x)
    torch.testing.assert_close(out, dense[where, torch.arange(len(x))], rtol=1e-4, atol=1e-5)
    assert torch.equal(where, simulate(dense, "maxprob", 0.4))
    scripted = to_torchscript(ee)
    with torch.no_grad():
        so, sw = scripted.forward_with_exits(x)
    torch.testing.assert_close(so, out, rtol=1e-5, atol=1e-5)
    assert torch.equal(sw, where)

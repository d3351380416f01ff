"""Cascade: the small model answers the confident rows, only the rest reach the large one."""

from __future__ import annotations

import math

import pytest
import torch

from torchslim.core.errors import ConfigError
from torchslim.core.stage import STAGES
from torchslim.core.train import TrainConfig, fit
from torchslim.dynamic import CascadeConfig, cascade, to_torchscript
from torchslim.dynamic.policy import simulate
from torchslim.zoo import build_model, build_task


@pytest.fixture(scope="module")
def pair():
    task = build_task("digits")
    torch.manual_seed(0)
    small = build_model("mlp", task, hidden=(16,))
    large = build_model("lenet300", task)
    fit(small, task, TrainConfig(epochs=8, lr=5e-3, seed=0, device="cpu"))
    fit(large, task, TrainConfig(epochs=8, lr=2e-3, seed=0, device="cpu"))
    return small.eval(), large.eval(), task


def test_bad_config():
    with pytest.raises(ConfigError, match="CascadeConfig.small"):
        CascadeConfig()
    with pytest.raises(ConfigError, match="CascadeConfig.policy"):
        CascadeConfig(small=torch.nn.Linear(2, 2), policy="patience")
    with pytest.raises(ConfigError, match="CascadeConfig.accuracy_drop"):
        CascadeConfig(small=torch.nn.Linear(2, 2), accuracy_drop=-0.1)


def test_cascade_calibrated_and_really_skips(pair):
    small, large, task = pair
    res = cascade(large, CascadeConfig(small=small, accuracy_drop=0.01), task)
    assert STAGES[CascadeConfig] is cascade
    info = res.info
    assert info["val_accuracy"] >= info["full_val_accuracy"] - 0.01 - 1e-9
    assert 0 < info["exit_rates"][0] < 1  # some rows answered by the small model, some not
    casc = res.model.eval()
    xs, ys = zip(*task.test)
    x, y = torch.cat(xs), torch.cat(ys)
    rows = []
    hook = casc.large.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    with torch.no_grad():
        out, where = casc.forward_with_exits(x)
        s, l = small(x), large(x)
    hook.remove()
    assert rows == [int(where.sum())]  # the large model saw only the rows sent to it
    ref = torch.where(where[:, None].bool(), l, s)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(where, simulate(torch.stack([s, l]), "maxprob", info["threshold"]))
    acc, full = (out.argmax(-1) == y).float().mean().item(), (l.argmax(-1) == y).float().mean().item()
    assert acc == pytest.approx(info["test_accuracy"], abs=1.5 / len(y))
    disagree = (out.argmax(-1) != l.argmax(-1)).float().mean().item()
    assert full - acc <= 0.01 + 3 * math.sqrt(max(disagree, 1 / len(y)) / len(y))
    scripted = to_torchscript(casc)
    with torch.no_grad():
        so, sw = scripted.forward_with_exits(x)
    torch.testing.assert_close(so, out)
    assert torch.equal(sw, where)

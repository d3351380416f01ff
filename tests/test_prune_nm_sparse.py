"""N:M masks and the compact sparse file format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from torchslim.core.errors import ConfigError, WeightsError
from torchslim.core.measure import file_bytes, state_dict_bytes
from torchslim.export.sparse import load_sparse, save_sparse
from torchslim.pruning.nm import NMConfig, check_nm, nm_mask, prune_nm
from torchslim.pruning.unstructured import PruneConfig, apply
from torchslim.zoo import build_model, build_task


@pytest.fixture(scope="module")
def task():
    return build_task("digits", batch_size=64)


def test_nm_mask_hand_example():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 0.0, -1.0, 0.4]])
    keep = nm_mask(w.abs(), 2, 4)
    assert keep.tolist() == [[False, True, True, False, True, False, True, False]]
    assert nm_mask(w.abs(), 1, 2).tolist() == [[False, True, True, False, True, False, True, False]]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_nm_pattern_holds_in_every_group(task, n, m):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.fc1 = nn.Linear(64, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            h = self.conv(x.reshape(-1, 1, 8, 8).expand(-1, 8, -1, -1))
            return self.fc2(torch.relu(self.fc1(h.mean(1).flatten(1))))

    model = Net()
    with pytest.warns(UserWarning, match="no speedup is expected"):
        _, info = prune_nm(model, NMConfig(n=n, m=m), task)
    assert info["speedup_expected"] is False and info["pattern"] == f"{n}:{m}"
    for mod in (model.conv, model.fc1, model.fc2):
        w = mod.weight
        g = w.movedim(1, -1).reshape(-1, m) if w.dim() > 2 else w.reshape(-1, m)
        assert ((g != 0).sum(1) == n).all()  # random init has no exact zeros: exactly n kept
        assert check_nm(w, n, m)
    assert info["sparsity"] == pytest.approx(1 - n / m)


def test_nm_keeps_pattern_through_finetune_and_skips_odd_sizes(task):
    torch.manual_seed(0)
    model = build_model("mlp", task, hidden=(30,))  # 30 inputs to the head: not a multiple of 4
    with pytest.warns(UserWarning, match=r"net\.3\.weight \(input size 30"):
        _, info = prune_nm(model, NMConfig(finetune={"epochs": 1, "lr": 1e-2}), task)
    assert check_nm(model.net[1].weight, 2, 4) and info["fit"]
    assert [r["layer"] for r in info["layers"]] == ["net.1.weight"]


@pytest.mark.parametrize("kwargs", [{"n": 5, "m": 4}, {"n": 0, "m": 4}, {"criterion": "nope"}])
def test_bad_nm_configs(kwargs):
    with pytest.raises(ConfigError) as err:
        NMConfig(**kwargs)
    assert "\n" not in str(err.value) and str(err.value).startswith("NMConfig.")


def test_sparse_file_round_trip_and_size(task, tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300", task)
    apply(model, PruneConfig(sparsity=0.9), task)
    path = save_sparse(model, tmp_path / "m.safetensors")
    ratio = file_bytes(path) / state_dict_bytes(model)
    assert ratio <= 0.20, ratio  # measured ~0.13 (uint8 gaps + fp32 values)
    fresh = load_sparse(path, build_model("lenet300", task))
    x = task.example_inputs(64)
    assert torch.equal(fresh(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    raw = load_file(str(path))  # a plain safetensors file: no pickle involved
    assert raw["net.1.weight::values"].numel() >= int(torch.count_nonzero(model.net[1].weight))


def test_encodings_edge_cases(tmp_path):
    long_gaps = torch.zeros(3000)
    long_gaps[[0, 256, 257, 1000, 2999]] = torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0])  # gaps 256, 743, 1999
    half = torch.randn(64, 64)
    half[half.abs() < 0.7] = 0  # ~50% zeros: the bitmask is the smaller encoding
    state = {"gaps": long_gaps, "bits": half, "dense": torch.randn(10), "empty": torch.zeros(0),
             "ints": torch.arange(5), "scalar": torch.tensor(0.0), "zeros": torch.zeros(7, 3),
             "bf16": torch.randn(300).to(torch.bfloat16) * (torch.rand(300) > 0.9)}
    path = save_sparse(state, tmp_path / "s.safetensors")
    back = load_sparse(path)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    raw = load_file(str(path))
    assert "gaps::gaps" in raw and "bits::bitmask" in raw and "dense" in raw
    # relative indices: 5 non-zeros plus bridging zeros: (256-1)//255 + (743-1)//255 + (1999-1)//255
    assert raw["gaps::values"].numel() == 5 + 1 + 2 + 7
    assert np.count_nonzero(raw["gaps::values"].numpy()) == 5


def test_load_errors(tmp_path):
    with pytest.raises(WeightsError):
        load_sparse(tmp_path / "missing.safetensors")
    path = save_sparse({"w": torch.zeros(4)}, tmp_path / "s.safetensors")
    with pytest.raises(WeightsError, match="does not match"):
        load_sparse(path, nn.Linear(2, 2))

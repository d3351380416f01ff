"""torchslim.load rebuilds a structurally pruned model from its own file (issue 10, point 4):
a fresh model of the original architecture takes the smaller shapes and computes exactly what
the pruned model computed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim
from torchslim import StructuredPruneConfig, WeightsError
from torchslim.export.weights import save_weights
from torchslim.zoo import build_model, build_task


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_structured_pruned_rescnn_rebuilds_from_its_file(tmp_path, suffix):
    pytest.importorskip("torch_pruning")
    task = build_task("mnist1d", num_samples=600, batch_size=32)
    torch.manual_seed(0)
    model = build_model("rescnn1d", task)
    fresh = copy.deepcopy(model)
    pruned = torchslim.prune(model, StructuredPruneConfig(macs_keep=0.5), task).model.eval()
    path = save_weights(pruned, tmp_path / f"m{suffix}")
    with pytest.raises(RuntimeError):  # what plain load_state_dict does with the smaller file
        copy.deepcopy(fresh).load_state_dict(torchslim.export.read_state_dict(path))
    rebuilt = torchslim.load(path, fresh).eval()
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in pruned.parameters())
    x = task.example_inputs(16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))


def test_depthwise_and_norm_layers_resize(tmp_path):
    torch.manual_seed(0)

    def net(c):
        return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1, groups=c), nn.GroupNorm(1, c),
                             nn.Flatten(), nn.Linear(c * 16, 10), nn.LayerNorm(10))

    small = net(5).eval()
    path = save_weights(small, tmp_path / "s.safetensors")
    rebuilt = torchslim.load(path, net(8)).eval()
    assert rebuilt[3].groups == rebuilt[3].in_channels == 5 and rebuilt[1].num_features == 5
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), small(x))


def test_unresizable_layer_is_refused_in_one_line_and_model_untouched(tmp_path):
    class Odd(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * self.scale

    path = save_weights(nn.Sequential(Odd(3)), tmp_path / "o.safetensors")
    target = nn.Sequential(Odd(5))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(WeightsError, match=r"0 \(Odd\) holds tensors of other shapes") as err:
        torchslim.load(path, target)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_key_is_refused(tmp_path):
    path = save_weights(nn.Sequential(nn.Linear(4, 4)), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="does not match the model: missing"):
        torchslim.load(path, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))

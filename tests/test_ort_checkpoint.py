"""An ONNX Runtime model survives a stage checkpoint (B14 found a resume refused: the model
held an OutputSpec object, which the checkpoint allowlist rightly does not build)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from torchslim.app.checkpoint import load_module, save_module
from torchslim.quantization.ort_backend import OrtQuantConfig, ort_quantize


class TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h), h


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(16, 4)), TwoOut()], ids=["tensor", "tuple"])
def test_ort_model_checkpoint_round_trip(tmp_path, model):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    q = ort_quantize(model.eval(), x[:2], OrtQuantConfig(mode="dynamic")).model
    save_module(q, tmp_path / "m.pt")
    back = load_module(tmp_path / "m.pt")
    a, b = q(x), back(x)
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b) == 2
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    else:
        assert torch.equal(a, b)

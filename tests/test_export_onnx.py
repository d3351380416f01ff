"""ONNX export: the file loads in ONNX Runtime and agrees with PyTorch (tolerances stated)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.core.errors import ConfigError
from torchslim.export.onnx import ExportError, OnnxExportConfig, export_onnx, ort_session, to_feed
from torchslim.zoo import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _ort(path, inputs) -> np.ndarray:
    return ort_session(path, threads=1).run(None, to_feed(inputs))[0]


def test_lenet300_dynamic_batch_agrees(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300", in_shape=(64,), num_classes=10).eval()
    path = export_onnx(model, torch.rand(8, 64), tmp_path / "lenet.onnx")
    x = torch.rand(33, 64)  # another batch size than the export's: the batch dim is symbolic
    out = _ort(path, x)
    ref = model(x).detach().numpy()
    assert out.shape == (33, 10)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)  # fp32 vs fp32: reordering only
    assert not (tmp_path / "lenet.onnx.data").exists()  # one self-contained file


def test_rescnn_with_batchnorm_agrees(tmp_path):
    torch.manual_seed(0)
    model = build_model("rescnn1d", in_shape=(40,), num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics, so folding BN at export is exercised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = export_onnx(model, torch.randn(4, 40), tmp_path / "res.onnx")
    x = torch.randn(17, 40)
    np.testing.assert_allclose(_ort(path, x), model(x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_dynamo_exporter_single_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    cfg = OnnxExportConfig(exporter="dynamo")
    path = export_onnx(model, torch.rand(8, 16), tmp_path / "d.onnx", config=cfg)
    x = torch.rand(5, 16)
    np.testing.assert_allclose(_ort(path, x), model(x).detach().numpy(), atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob("*.data"))


def test_minilm_small_input_agrees(tmp_path):
    pytest.importorskip("transformers")
    from torchslim.zoo.minilm import load_minilm, load_tokenizer

    model = load_minilm()
    tok = load_tokenizer()
    enc = tok(["A short sentence.", "Return the number of items."], padding=True, return_tensors="pt")
    path = export_onnx(model, dict(enc), tmp_path / "minilm.onnx")
    # different batch and sequence length than the export: both dims are symbolic
    other = tok(["Open a file.", "Compute the greatest common divisor of two integers.", "Hi."],
                padding=True, return_tensors="pt")
    out = _ort(path, dict(other))
    with torch.no_grad():
        ref = model(**other).numpy()
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 1 - 1e-6  # unit embeddings; fp32 reordering changes ~1e-7
    np.testing.assert_allclose(out, ref, atol=1e-5)


class _Unsupported(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real  # no ONNX symbolic for eigvals


def test_unsupported_op_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"(?i)eig"):
        export_onnx(_Unsupported(), torch.rand(2, 3, 3), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()  # atomic: no partial file left behind


def test_config_validation():
    with pytest.raises(ConfigError, match="OnnxExportConfig.exporter"):
        OnnxExportConfig(exporter="tf")
    with pytest.raises(ConfigError, match="OnnxExportConfig.opset"):
        OnnxExportConfig(opset=5)


def test_verification_catches_mismatch(tmp_path):
    class Noisy(nn.Module):  # a different result on every call: ORT cannot agree with PyTorch
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(Noisy(), torch.zeros(2, 3), tmp_path / "n.onnx")

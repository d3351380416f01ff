"""The ONNX Runtime int8 file says where its bytes go (issue 10: a tiny depthwise CNN's int8
.onnx was no smaller than fp32, silently): weights shrink 4x, graph structure does not."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from torchslim.quantization.ort_backend import OrtQuantConfig, ort_quantize


def _quantize(model, d):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ort_quantize(model.eval(), torch.randn(4, d), OrtQuantConfig(mode="dynamic"))
    return res, [str(w.message) for w in caught if "graph structure" in str(w.message)]


def test_tiny_model_int8_file_names_its_graph_overhead():
    torch.manual_seed(0)
    res, said = _quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 8)
    size = res.info["size"]
    assert size["tensor_bytes"] + size["graph_bytes"] == size["file_bytes"] == res.model.file_bytes
    assert size["graph_bytes"] > size["tensor_bytes"]
    assert len(said) == 1 and f"{size['tensor_bytes']:,} bytes" in said[0]


def test_real_sized_model_int8_file_is_about_four_times_smaller_and_quiet():
    torch.manual_seed(0)
    res, said = _quantize(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)), 256)
    assert not said
    assert res.info["fp32_onnx_bytes"] > 3.0 * res.model.file_bytes  # 4x on the weights, minus scales and graph

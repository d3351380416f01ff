"""The real-kernel backends on the one layer vocabulary (issue 11, item 2): ``TorchaoConfig.layers``
and ``OrtQuantConfig.layers`` (exclude = kept float) replace ``skip`` / ``exclude_layers``, the
old names are refused in one line naming the new one, and ``convert`` fills ``layers`` with the
plan's float layers, each matched exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from torchslim.core.errors import ConfigError
from torchslim.core.selection import LayerSelection
from torchslim.quantization import ptq
from torchslim.quantization.config import QuantConfig
from torchslim.quantization.convert import ort_config_from, torchao_config_from
from torchslim.quantization.mixed import LayerChoice

warnings.filterwarnings("ignore")

NEW = "layers: {exclude: [...]}"


def test_old_backend_names_are_refused_naming_layers():
    pytest.importorskip("onnxruntime")
    from torchslim.quantization.ort_backend import OrtQuantConfig
    from torchslim.quantization.torchao_backend import TorchaoConfig

    with pytest.raises(ConfigError) as err:
        TorchaoConfig(skip=("fc",))
    assert str(err.value) == f"TorchaoConfig.skip: renamed — write {NEW}"
    with pytest.raises(ConfigError) as err:
        OrtQuantConfig(exclude_layers=("fc",))
    assert str(err.value) == f"OrtQuantConfig.exclude_layers: renamed — write {NEW}"
    with pytest.raises(ConfigError) as err:  # the same key passed through a QuantConfig
        QuantConfig(backend="onnxruntime", ort_options={"exclude_layers": ["fc"]})
    assert str(err.value) == f"QuantConfig.ort_options.exclude_layers: renamed — write {NEW}"
    ok = QuantConfig(backend="onnxruntime", ort_options={"layers": {"exclude": ["fc"]}})
    assert ok.ort_options == {"layers": {"exclude": ["fc"]}}


def test_convert_fills_layers_with_the_plan_float_layers_exactly():
    pytest.importorskip("onnxruntime")
    plan = [LayerChoice("net.0", None), LayerChoice("net[2]", None), LayerChoice("net.4", 8)]
    ocfg, _ = ort_config_from(QuantConfig(bits=8, mode="dynamic", backend="onnxruntime"), plan)
    tcfg = torchao_config_from(QuantConfig(bits=8, mode="dynamic", backend="torchao"), plan)
    for sel in (ocfg.layers, tcfg.layers):
        assert isinstance(sel, LayerSelection) and sel.include == ("*",)
        # a name with a glob character is escaped: it matches itself and nothing else
        assert [n for n in ("net.0", "net[2]", "net2", "net.4", "net.0.1") if sel.named(n)] == ["net2", "net.4", "net.0.1"]
    assert torchao_config_from(QuantConfig(bits=8, mode="dynamic"), [LayerChoice("a", 8)]).layers == LayerSelection()


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_torchao_layers_patterns_and_types(lenet300_digits):
    pytest.importorskip("torchao")
    from torchslim.quantization.torchao_backend import TorchaoConfig, torchao_quantize

    model, _ = lenet300_digits
    names = _linears(model)
    assert len(names) == 3
    _, info = torchao_quantize(model, TorchaoConfig(scheme="int8_weight_only", layers={"include": [names[0]]}))
    assert info["quantized_layers"] == 1 and sorted(info["float_layers"]) == sorted(names[1:])
    _, info = torchao_quantize(model, TorchaoConfig(scheme="int8_weight_only", layers={"types": ["Conv1d"]}))
    assert info["quantized_layers"] == 0 and set(info["float_layers"]) == set(names)


def test_torchao_keeps_a_smoothed_layer_float_by_its_plan_name(lenet300_digits):
    """A SmoothQuant layer "a.b" is "a.b.1" after defake (behind its divide); excluding "a.b"
    keeps it float, as ``skip`` did."""
    pytest.importorskip("torchao")
    from torchslim.quantization.torchao_backend import TorchaoConfig, defake, torchao_quantize

    model, task = lenet300_digits
    sim, _ = ptq.simulate(model, QuantConfig(bits=8, mode="dynamic", smooth_alpha=0.5, batches=2), task)
    smoothed = [n.removesuffix(".1") for n in _linears(defake(sim)) if n.endswith(".1")]
    assert smoothed, "no layer was smoothed"
    name = smoothed[0]
    _, info = torchao_quantize(sim, TorchaoConfig(scheme="int8_weight_only", layers={"exclude": [name]}))
    assert info["float_layers"] == {f"{name}.1": "kept float by the plan"}
    assert info["quantized_layers"] == len(_linears(model)) - 1


def test_ort_layers_patterns_keep_the_unselected_layers_float(lenet300_digits):
    pytest.importorskip("onnxruntime")
    from torchslim.quantization.ort_backend import OrtQuantConfig, ort_quantize

    model, task = lenet300_digits
    names = _linears(model)
    prefix = names[0].rpartition(".")[0]
    # every Linear but the first by a glob; a pattern matching no layer is recorded, not refused
    sel = {"include": [f"{prefix}*" if prefix else "*"], "exclude": [names[0], "nowhere.*"]}
    res = ort_quantize(model, task.example_inputs(), OrtQuantConfig(mode="dynamic", layers=sel), task)
    assert len(res.info["excluded_nodes"]) == 1 and res.info["excluded_layers_not_found"] == ["nowhere.*"]
    assert sum(res.info["quantized_nodes"].values()) == 2
    res = ort_quantize(model, task.example_inputs(), OrtQuantConfig(mode="dynamic", layers={"types": ["Conv1d"]}), task)
    assert len(res.info["excluded_nodes"]) == 3 and sum(res.info["quantized_nodes"].values()) == 0
    x = task.example_inputs(8)
    with torch.no_grad():
        assert torch.allclose(res.model(x), model(x), atol=1e-4)  # all float: the fp32 graph's numbers

"""Real int8 backends (ONNX Runtime, torchao): they run, agree with the simulation / fp32 within
stated bounds, keep plan layers float, and their files are really ~4x smaller."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from torchslim.core import isa
from torchslim.core.errors import ConfigError
from torchslim.core.selection import LayerSelection
from torchslim.core.task import Task
from torchslim.quantization import ptq
from torchslim.quantization.backends import (
    OrtModel,
    OrtQuantConfig,
    TorchaoConfig,
    ort_fp32,
    ort_quantize,
    saved_bytes,
    torchao_quantize,
)
from torchslim.quantization.config import BACKENDS, QuantConfig
from torchslim.quantization.mixed import LayerChoice
from torchslim.quantization.ort_backend import layer_nodes
from torchslim.zoo import build_model

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def digits(lenet300_digits):
    return lenet300_digits


def _logits(model, task):
    return task.outputs_and_targets(model, "test")[0]


def _fp32_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def test_backends_registered():
    assert {"onnxruntime", "torchao", "auto"} <= set(BACKENDS)


# ORT vs its simulation, dynamic int8: both compute the exact int32 products of the same integers
# on every ISA, so only the float epilogue differs (measured 1.2e-7 of the logit range on AVX2).
# Why the old check (2% of the range) failed on AVX2 without VNNI (gap 0.46 on logits of 4.0):
# ORT's u8s8 kernels (vpmaddubsw) add pairs of u8*s8 products into a saturating int16, and
# full-range 8-bit weights overflow it (2*255*127 > 32767); ORT then equals the saturating-pair
# model, not the exact product (tests/test_quant_isa.py). Now the plan takes reduce_range there
# (weights in [-64, 64]: pairs <= 32640, exact) and the simulation uses that grid; with VNNI
# (int32 dot products) both keep full 8-bit weights. The bound, the same on both ISAs, still
# catches a 0.2% scale error (0.0024 of the range), a simulation on the wrong weight grid (0.0075)
# and saturation (0.116): tests/test_quant_isa.py checks each.
AGREE = 1e-3


def test_ort_dynamic_agrees_with_simulation(digits):
    model, task = digits
    cfg = QuantConfig(mode="dynamic", granularity="per_channel", backend="onnxruntime")
    res = ptq.apply(model, cfg, task)
    assert isinstance(res.model, OrtModel)
    assert res.info["quantized_nodes"].get("MatMulInteger", 0) + res.info["quantized_nodes"].get("DynamicQuantizeMatMul", 0) == 3
    assert res.info["reduce_range"] is isa.int8_saturates() and res.info["isa_plan"]["reduce_range"]["chosen_by"] == "isa"
    sim, _ = ptq.simulate(model, cfg, task)  # the simulation of this plan (same weight grid as ORT here)
    real, ref = _logits(res.model, task), _logits(sim, task)
    assert (real - ref).abs().max() <= AGREE * ref.abs().max()
    assert (real.argmax(1) == ref.argmax(1)).float().mean() >= 0.99


def test_ort_static_uses_simulated_ranges(digits):
    model, task = digits
    fp32_acc = task.evaluate(model)
    cfg = QuantConfig(mode="static", calibration="minmax", backend="onnxruntime")
    res = ptq.apply(model, cfg, task)
    assert res.info["activation_ranges_from_simulation"] == 3  # every Linear input range handed over
    sim, _ = ptq.simulate(model, cfg, task)
    real, ref = _logits(res.model, task), _logits(sim, task)
    # ORT also rounds every Gemm/Relu output with its own calibrated QDQ (the simulation only
    # rounds layer inputs), so the gap is not zero: measured on AVX2 (7-bit weights) mean 0.17%
    # and worst 5.7% of the logit range; bound 0.5% and 10%. The old failure here (mean 1.8%) was
    # the same int16 saturation as in the dynamic test: the QDQ graph runs as u8s8 QGemm kernels.
    gap = (real - ref).abs()
    assert gap.mean() <= 0.005 * ref.abs().max() and gap.max() <= 0.10 * ref.abs().max()
    assert (real.argmax(1) == ref.argmax(1)).float().mean() >= 0.97
    assert task.evaluate(res.model) >= fp32_acc - 0.02  # 360 test digits: <= 2 pt (7 images)


def test_plan_float_layer_is_excluded(digits):
    model, task = digits
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    cfg = OrtQuantConfig(mode="dynamic", layers=LayerSelection(exclude=(first,)))
    res = ort_quantize(model, task.example_inputs(), cfg, task)
    assert len(res.info["excluded_nodes"]) == 1 and res.info["excluded_layers_not_found"] == []
    assert sum(res.info["quantized_nodes"].values()) == 2  # 3 Linear, 1 kept float


def test_layer_nodes_matches_every_linear(digits, tmp_path):
    from torchslim.export.onnx import export_onnx

    model, task = digits
    path = export_onnx(model, task.example_inputs(4), tmp_path / "m.onnx")
    found = layer_nodes(path, model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(found) == sorted(linears)


def test_ort_file_is_small_and_model_portable(digits, tmp_path):
    model, task = digits
    res = ort_quantize(model, task.example_inputs(), OrtQuantConfig(mode="dynamic"), task)
    assert res.model.file_bytes <= 0.30 * _fp32_bytes(model)
    f32 = ort_fp32(model, task.example_inputs())
    assert f32.file_bytes > 3 * res.model.file_bytes
    clone = pickle.loads(pickle.dumps(res.model))  # sessions are rebuilt after pickling / copying
    x = task.example_inputs(16)
    assert torch.equal(clone(x), res.model(x)) and torch.equal(copy.deepcopy(res.model)(x), res.model(x))
    res.model.save(tmp_path / "q.onnx")
    assert torch.equal(OrtModel.from_file(tmp_path / "q.onnx")(x), res.model(x))


def test_torchao_int8_agrees_with_fp32_and_is_small(digits):
    model, task = digits
    q, info = torchao_quantize(model, TorchaoConfig(scheme="int8_dynamic"))
    assert info["quantized_layers"] == 3 and info["float_layers"] == {}
    real, ref = _logits(q, task), _logits(model, task)
    assert (real - ref).abs().max() <= 0.05 * ref.abs().max()  # int8 weights + per-token int8 activations
    assert (real.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    assert saved_bytes(q) <= 0.30 * _fp32_bytes(model)


def test_torchao_names_conv_layers_left_float():
    torch.manual_seed(0)
    model = build_model("rescnn1d", in_shape=(40,), num_classes=10, width=8, blocks=1).eval()
    q, info = torchao_quantize(model, TorchaoConfig(scheme="int8_weight_only"))
    assert "stem.0" in info["float_layers"] and "Conv1d" in info["float_layers"]["stem.0"]
    assert info["quantized_layers"] == 1  # only the final Linear
    x = torch.randn(4, 40)
    assert torch.allclose(q(x), model(x), atol=0.05 * model(x).abs().max().item())


def test_torchao_excluded_layer_kept_float(digits):
    model, _ = digits
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    q, info = torchao_quantize(model, TorchaoConfig(scheme="int8_weight_only", layers={"exclude": [name]}))
    assert info["float_layers"] == {name: "kept float by the plan"}
    assert type(q.get_submodule(name).weight) is nn.Parameter or q.get_submodule(name).weight.dtype == torch.float32


def test_auto_records_choice(digits):
    model, task = digits
    res = ptq.apply(model, QuantConfig(mode="dynamic", backend="auto"), task)
    auto = res.info["auto"]
    assert auto["chosen"] in ("onnxruntime", "torchao") and set(auto["median_ms"]) >= {"fp32_eager", auto["chosen"]}
    assert res.save is not None


def test_bad_configs_fail_fast():
    with pytest.raises(ConfigError, match="OrtQuantConfig.calibration"):
        OrtQuantConfig(calibration="mse")
    with pytest.raises(ConfigError, match="TorchaoConfig.scheme"):
        TorchaoConfig(scheme="int3")
    from torchslim.quantization.convert import torchao_config_from

    with pytest.raises(ConfigError, match="QuantConfig.bits"):
        torchao_config_from(QuantConfig(bits=4, mode="dynamic"), [LayerChoice("x", 4)])


def test_static_without_data_is_refused(digits):
    model, task = digits
    no_data = Task(name="nodata", test=task.test)
    with pytest.raises(ConfigError, match="no train or val split"):
        ort_quantize(model, task.example_inputs(), OrtQuantConfig(mode="static"), no_data)


class _TokenMLP(nn.Module):
    """Linear layers on (batch, tokens, features): exported as MatMul, the op MatMulNBits takes."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.15)])
def test_blockwise_matmul_nbits(bits, bound):
    torch.manual_seed(0)
    model = _TokenMLP().eval()
    x = torch.randn(3, 7, 64)
    res = ort_quantize(model, x, OrtQuantConfig(mode="dynamic", block_bits=bits, block_size=32))
    assert res.info["quantized_nodes"].get("MatMulNBits") == 2
    out, ref = res.model(x), model(x)
    # relative error of the whole output: 8-bit blocks of 32 with per-block int8 activations
    # stay within 2%; 4-bit weights (15 levels per block) within 15%
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= bound
    assert res.model.file_bytes < (0.4 if bits == 8 else 0.3) * _fp32_bytes(model)


def test_per_group_config_maps_to_blocks():
    from torchslim.quantization.convert import ort_config_from

    ocfg, _ = ort_config_from(QuantConfig(mode="dynamic", granularity="per_group", group_size=32), [])
    assert (ocfg.block_bits, ocfg.block_size, ocfg.block_int8_compute) == (8, 32, True)
    ocfg, _ = ort_config_from(QuantConfig(bits=4, mode="weights_only", granularity="per_group", group_size=64), [])
    assert (ocfg.block_bits, ocfg.block_size, ocfg.block_int8_compute) == (4, 64, False)


def _outlier_task(seed: int = 0):
    """_TokenMLP inputs where channel 5 is ~60x the others (like BERT's LayerNorm outliers)."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 9, 64, generator=g) for _ in range(3)]
    for x in xs:
        x[..., 5] *= 60
    data = [(x, torch.zeros(4)) for x in xs]
    loader = DataLoader(data, batch_size=None)
    return Task(name="outliers", test=loader, train=loader), xs[0]


def test_smooth_graph_keeps_the_float_function(tmp_path):
    from torchslim.export.onnx import export_onnx, ort_session
    from torchslim.quantization.ort_graph import activation_absmax, smooth_graph

    torch.manual_seed(0)
    model = _TokenMLP().eval()
    task, x = _outlier_task()
    src = export_onnx(model, x, tmp_path / "m.onnx")
    nodes = layer_nodes(src, model)["up"]
    amax = activation_absmax(src, nodes, [{"input": b.numpy()} for b, _ in task.train])
    assert len(amax) == 1 and float(next(iter(amax.values()))[5]) == pytest.approx(float(x.new_tensor(
        [b[..., 5].abs().max() for b, _ in task.train]).max()), rel=1e-6)  # max |x| of channel 5
    scales = smooth_graph(src, tmp_path / "s.onnx", amax, 0.5, nodes)
    assert list(scales) == nodes and scales[nodes[0]] > 1
    ref = ort_session(str(src)).run(None, {"input": x.numpy()})[0]
    out = ort_session(str(tmp_path / "s.onnx")).run(None, {"input": x.numpy()})[0]
    # (x / s)(s W) = x W: only float rounding moves (1e-5 of the output range)
    assert abs(out - ref).max() <= 1e-5 * abs(ref).max()


def test_smoothquant_cuts_per_tensor_error_on_outlier_channels():
    torch.manual_seed(0)
    model = _TokenMLP().eval()
    task, _ = _outlier_task()
    x = _outlier_task(seed=1)[1]  # unseen batch with the same outlier channel
    ref = model(x)

    def rel(cfg):
        res = ort_quantize(model, x, cfg, task)
        return ((res.model(x) - ref).norm() / ref.norm()).item(), res.info

    plain, _ = rel(OrtQuantConfig(mode="dynamic", optimize=False))
    smooth, info = rel(OrtQuantConfig(mode="dynamic", optimize=False, smooth_alpha=0.5, smooth_layers=("up",)))
    assert len(info["smoothed_nodes"]) == 1 and info["quantized_nodes"].get("MatMulInteger", 0) + info["quantized_nodes"].get("DynamicQuantizeMatMul", 0) == 2
    # one per-tensor scale over a 60x channel leaves the others ~few levels; smoothing evens the
    # channels out: measured 0.035 -> 0.009 here; require at least a 2x cut
    assert smooth <= 0.5 * plain


def test_block_layers_pick_the_matmulnbits_nodes():
    torch.manual_seed(0)
    model = _TokenMLP().eval()
    x = torch.randn(3, 7, 64)
    res = ort_quantize(model, x, OrtQuantConfig(mode="dynamic", block_bits=8, block_size=32, block_layers=("down",)))
    q = res.info["quantized_nodes"]
    assert q.get("MatMulNBits") == 1 and q.get("MatMulInteger", 0) + q.get("DynamicQuantizeMatMul", 0) == 1
    assert len(res.info["block_nodes"]) == 1
    ref = model(x)
    # "up" (input randn: uint8 values all over [0, 255]) runs on MatMulInteger, the "down" blocks
    # on MatMulNBits. The old failure on AVX2 (0.151) was "up": u8s8 int16 saturation with 8-bit
    # weights (MatMulNBits itself does not saturate, tests/test_quant_isa.py). With the 7-bit
    # weights chosen there: measured 0.012; with VNNI the 8-bit weights are finer. Same bound
    # as the all-blocks case on both ISAs.
    assert ((res.model(x) - ref).norm() / ref.norm()).item() <= 0.02


def test_mixed_kernel_configs_fail_fast():
    with pytest.raises(ConfigError, match="OrtQuantConfig.block_layers"):
        OrtQuantConfig(block_layers=("down",))
    with pytest.raises(ConfigError, match="OrtQuantConfig.smooth_alpha"):
        OrtQuantConfig(smooth_alpha=1.5)
    with pytest.raises(ConfigError, match="OrtQuantConfig.smooth_alpha"):
        OrtQuantConfig(mode="static", smooth_alpha=0.5)

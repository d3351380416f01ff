"""Quantization chosen per ISA (isa_plan.py): why ORT's int8 differs from exact arithmetic on x86
without VNNI, that the default plan avoids it, that the simulation models what ORT computes,
and that the ORT-vs-simulation check still fails on a real mismatch.

Where a figure depends on the CPU the test says what it expects on each ISA; tests that force
one ISA (monkeypatched ``isa.int8_saturates``) check the decisions, not the kernels."""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.core import isa
from torchslim.quantization import fake, isa_plan, ptq
from torchslim.quantization.backends import OrtQuantConfig, ort_quantize
from torchslim.quantization.config import QuantConfig

AGREE = 1e-3  # as tests/test_quant_backends.py: ORT vs simulation, max gap / logit range


@pytest.fixture(scope="module")
def digits(lenet300_digits):
    return lenet300_digits


def _logits(model, task):
    return task.outputs_and_targets(model, "test")[0]


def _gap(real, sim, task) -> float:
    a, b = _logits(real, task), _logits(sim, task)
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def saturating(monkeypatch):
    """Decide as on a CPU whose int8 products saturate (True) or not (False)."""
    def force(value: bool):
        monkeypatch.setattr(isa, "int8_saturates", lambda: value)
    return force


# ---------------------------------------------------------------------------- the kernel facts
def _matmul_integer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from onnx import TensorProto, helper

    from torchslim.export.onnx import ort_session

    btype = TensorProto.INT8 if b.dtype == np.int8 else TensorProto.UINT8
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, a.shape),
                           helper.make_tensor_value_info("B", btype, b.shape)],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return ort_session(m.SerializeToString()).run(None, {"A": a, "B": b})[0]


def test_matmul_integer_saturates_only_without_vnni_and_reduce_range_is_exact():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 256), dtype=np.uint8)
    full = rng.integers(-127, 128, (256, 48)).astype(np.int8)
    reduced = rng.integers(-64, 65, (256, 48)).astype(np.int8)  # ORT reduce_range weights
    # 7-bit weights: every pair of u8*s8 products is <= 2*255*64 = 32640 < 2^15: exact anywhere
    assert np.array_equal(_matmul_integer(a, reduced), a.astype(np.int64) @ reduced)
    y, exact = _matmul_integer(a, full), a.astype(np.int64) @ full
    if isa.int8_saturates():
        # vpmaddubsw: adjacent pairs of products summed into a saturating int16, then exact
        p = a.astype(np.int32)[:, :, None] * full.astype(np.int32)[None]
        pairs = np.clip(p[:, 0::2] + p[:, 1::2], -32768, 32767).sum(1)
        assert np.array_equal(y, pairs)  # ORT is this model bit for bit (measured: AMD EPYC AVX2)
        assert np.mean(y != exact) > 0.5  # random full-range operands: most sums wrong (99%)
    else:  # VNNI / AMX (int32 dot products) and arm (sdot/udot) kernels are exact
        assert np.array_equal(y, exact)


class _One(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.l = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.l.weight.data = w

    def forward(self, x):
        return self.l(x)


def test_matmul_nbits_int8_compute_does_not_saturate():
    """8-bit blocks with int8 compute (accuracy_level 4) on all-maximum operands, where a
    saturating pair sum would show: exact on every ISA (AVX2 included). Float compute
    (accuracy_level 0) is x @ dequantized W, and int8 compute is that with x quantized per block
    of block_size (int8, scale max|x| / 127), both to float rounding (measured 5e-7, 3e-7)."""
    k, n = 256, 16
    for w, x in ((torch.ones(n, k), torch.ones(2, 4, k)), (-torch.ones(n, k), torch.ones(2, 4, k))):
        m = _One(w).eval()
        for int8 in (True, False):
            res = ort_quantize(m, x, OrtQuantConfig(mode="dynamic", optimize=False, block_bits=8, block_size=32,
                                                    block_int8_compute=int8))
            assert torch.equal(res.model(x), m(x))
    torch.manual_seed(0)
    w, x = torch.randn(n, k), torch.randn(2, 4, k)
    # ORT's symmetric 8-bit blocks: q = round(w / s), s = (signed max-|w| value) / -128, q in [-128, 127]
    blocks = w.reshape(n, -1, 32)
    s = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True)) / -128
    wq = (torch.round(blocks / s).clamp(-128, 127) * s).reshape(n, k)
    xb = x.reshape(2, 4, -1, 32)
    xs = xb.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(xb / xs).clamp(-127, 127) * xs).reshape(x.shape)
    for int8, xin in ((False, x), (True, xq)):
        res = ort_quantize(_One(w).eval(), x, OrtQuantConfig(mode="dynamic", optimize=False, block_bits=8, block_size=32,
                                                             block_int8_compute=int8))
        ref = xin @ wq.T
        assert ((res.model(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5


# ---------------------------------------------------------------------------- the decisions
def test_default_reduce_range_follows_the_isa(saturating):
    for sat in (True, False):
        saturating(sat)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a default never warns
            cfg, plan = isa_plan.resolve_ort(OrtQuantConfig())
        assert cfg.reduce_range is sat and plan["reduce_range"]["chosen_by"] == "isa"
        assert plan["int8_saturates"] is sat and plan["isa"] == isa.cpu_isa()["summary"]
        assert ("saturating int16" in plan["reduce_range"]["why"]) is sat


def test_explicit_full_range_is_honoured_with_one_warning(digits, saturating):
    model, task = digits
    saturating(True)
    cfg = QuantConfig(mode="dynamic", backend="onnxruntime", ort_options={"reduce_range": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ptq.apply(model, cfg, task)
    ours = [w for w in caught if "reduce_range" in str(w.message)]
    assert len(ours) == 1 and "OrtQuantConfig.reduce_range=False" in str(ours[0].message)
    assert "saturating int16" in str(ours[0].message)
    assert res.info["reduce_range"] is False and res.info["isa_plan"]["reduce_range"]["chosen_by"] == "user"
    assert "weight_reduce_range" not in res.info  # the simulation follows the user: full 8-bit grid
    saturating(False)  # where products do not saturate, the same choice is simply taken
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        isa_plan.resolve_ort(OrtQuantConfig(reduce_range=False))


def test_simulation_uses_the_backend_weight_grid(digits, saturating):
    model, _ = digits
    layer = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    saturating(True)
    assert isa_plan.sim_reduce_range(QuantConfig(backend="onnxruntime"), layer)
    assert isa_plan.sim_reduce_range(QuantConfig(backend="auto"), layer)
    assert not isa_plan.sim_reduce_range(QuantConfig(backend="simulate"), layer)  # the ideal int8
    assert not isa_plan.sim_reduce_range(QuantConfig(backend="onnxruntime", ort_options={"reduce_range": False}), layer)
    assert not isa_plan.sim_reduce_range(QuantConfig(backend="onnxruntime", granularity="per_group", group_size=32), layer)
    blocks = {"block_bits": 8, "block_layers": (layer,)}  # MatMulNBits ignores reduce_range
    assert not isa_plan.sim_reduce_range(QuantConfig(backend="onnxruntime", ort_options=blocks), layer)
    saturating(False)
    assert not isa_plan.sim_reduce_range(QuantConfig(backend="onnxruntime"), layer)
    assert isa_plan.sim_reduce_range(QuantConfig(backend="onnxruntime", ort_options={"reduce_range": True}), layer)


def test_reduced_weight_grid_is_orts():
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    wq = fake.WeightQuantizer(8, True, "per_channel")
    wq.reduce_range = True
    wq.calibrate(w)
    q, scale, _ = wq.integer_weights(w)
    assert fake.qrange(8, True, True) == (-64, 64) and fake.qrange(8, False, True) == (0, 127)
    assert fake.qrange(4, True, True) == fake.qrange(4, True)  # only 8-bit has ORT's reduced range
    assert torch.allclose(scale, w.abs().amax(1) / 64)  # ORT: (2 max|w|) / (64 - -64)
    assert int(q.abs().max()) == 64


# ---------------------------------------------------------------------------- the check bites
def test_agreement_check_fails_on_a_real_mismatch(digits):
    """Forced reduce_range=True on any ISA (exact on every CPU): the matching simulation agrees
    within AGREE; a simulation on ORT's full 8-bit grid, or with one layer's scales 0.5% off, does
    not (measured 0.0075 and ~0.004 of the logit range)."""
    model, task = digits
    cfg = QuantConfig(mode="dynamic", backend="onnxruntime", ort_options={"reduce_range": True})
    res = ptq.apply(model, cfg, task)
    sim, info = ptq.simulate(model, cfg, task)
    assert info["weight_reduce_range"]["qrange"] == [-64, 64]
    assert _gap(res.model, sim, task) <= AGREE
    wrong_grid, _ = ptq.simulate(model, QuantConfig(mode="dynamic"), task)
    assert _gap(res.model, wrong_grid, task) > 3 * AGREE
    wrong_scale = copy.deepcopy(sim)
    wq = [m for m in wrong_scale.modules() if isinstance(m, fake.WeightQuantizer)][1]
    wq.scale = wq.scale * 1.005
    assert _gap(res.model, wrong_scale, task) > AGREE


def test_full_range_ort_matches_the_simulation_only_with_vnni(digits):
    """ORT with 8-bit weights against the 8-bit simulation: exact with VNNI; on a saturating CPU
    the gap is the int16 overflow (measured 0.116 of the logit range), which the check reports."""
    model, task = digits
    cfg = QuantConfig(mode="dynamic", backend="onnxruntime", ort_options={"reduce_range": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ptq.apply(model, cfg, task)
    sim, _ = ptq.simulate(model, cfg, task)
    gap = _gap(res.model, sim, task)
    if isa.int8_saturates():
        assert gap > 0.02
    else:
        assert gap <= AGREE


def test_auto_does_not_build_a_path_known_slow_here(digits, saturating):
    model, task = digits
    saturating(True)
    res = ptq.apply(model, QuantConfig(mode="dynamic", backend="auto"), task)
    auto = res.info["auto"]
    assert auto["chosen"] == "onnxruntime" and "torchao" not in auto["median_ms"]
    assert "known slow" in auto["skipped"]["torchao"] and "int8_dynamic" in auto["skipped"]["torchao"]
    assert auto["isa"] == isa.describe() and res.info["isa_plan"]["reduce_range"]["value"] is True
    from torchslim.quantization.convert import to_torchao

    with warnings.catch_warnings(record=True) as caught:  # asked for explicitly: built, said once
        warnings.simplefilter("always")
        out = to_torchao(ptq.simulate(model, QuantConfig(mode="dynamic"), task)[0], [], QuantConfig(mode="dynamic", backend="torchao"), task)
    assert len([w for w in caught if "known slow" in str(w.message) or "ran 0.05x" in str(w.message)]) == 1
    assert "known_slow_here" in out.info
    saturating(False)
    assert isa_plan.torchao_known_slow("int8_dynamic", False) is None


def test_ort_logs_are_silenced_without_touching_the_root_logger(digits, caplog):
    model, task = digits
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    ort_quantize(model, task.example_inputs(), OrtQuantConfig(mode="static", batches=1), task)
    assert root.level == level and root.handlers == handlers and not root.filters
    with caplog.at_level(logging.WARNING):
        logging.getLogger("user.code").warning("still heard")
    assert "still heard" in caplog.text

"""Fake quantization: hand-computed round trips, STE gradients, a torch peer check, config errors."""

import pytest
import torch
from torch import nn

from torchslim.core.errors import ConfigError
from torchslim.quantization.config import QuantConfig, validate_for_model
from torchslim.quantization.fake import (
    ActQuantizer,
    FakeQuantLayer,
    WeightQuantizer,
    dequantize,
    fake_quantize,
    qparams,
    quantize_tensor,
)

W = torch.tensor([[-0.9, 0.5, 2.0, -0.3], [0.1, -0.4, 0.25, 0.05]])

# Integers and scales worked out by hand (see fake.py for the conventions): symmetric 4-bit
# uses [-8, 7] with scale = max|x| / 7; asymmetric uses [0, 15] with scale = (hi - lo) / 15 and
# zero point round(-lo / scale), lo <= 0 <= hi.
CASES = {
    ("symmetric", "per_tensor"): ([[-3, 2, 7, -1], [0, -1, 1, 0]], [2.0 / 7], [0]),
    ("asymmetric", "per_tensor"): ([[0, 8, 15, 3], [6, 3, 6, 5]], [2.9 / 15], [5]),
    ("symmetric", "per_channel"): ([[-3, 2, 7, -1], [2, -7, 4, 1]], [2.0 / 7, 0.4 / 7], [0, 0]),
    ("asymmetric", "per_channel"): ([[0, 8, 15, 3], [11, 0, 15, 10]], [2.9 / 15, 0.65 / 15], [5, 9]),
    ("symmetric", "per_group"): ([[-7, 4, 7, -1], [2, -7, 7, 1]], [0.9 / 7, 2.0 / 7, 0.4 / 7, 0.25 / 7], [0, 0, 0, 0]),
    ("asymmetric", "per_group"): ([[0, 15, 15, 0], [15, 0, 15, 3]], [1.4 / 15, 2.3 / 15, 0.5 / 15, 0.25 / 15], [10, 2, 12, 0]),
}


@pytest.mark.parametrize("scheme,gran", list(CASES))
def test_round_trip_matches_hand_computation(scheme, gran):
    ints, scales, zps = CASES[(scheme, gran)]
    wq = WeightQuantizer(4, scheme == "symmetric", gran, group_size=2)
    wq.calibrate(W)
    q, scale, zp = wq.integer_weights(W)
    assert q.tolist() == ints
    assert torch.allclose(scale.reshape(-1), torch.tensor(scales), rtol=1e-6)
    assert zp.reshape(-1).tolist() == zps
    # fake quant == dequantize(hand integers) to float tolerance
    s = torch.tensor(scales).repeat_interleave(W.numel() // len(scales)).reshape(W.shape)
    z = torch.tensor(zps, dtype=torch.float32).repeat_interleave(W.numel() // len(zps)).reshape(W.shape)
    expected = (torch.tensor(ints, dtype=torch.float32) - z) * s
    assert torch.allclose(wq.eval()(W), expected, atol=1e-6)


def test_functions_agree_with_torch_fake_quantize_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * torch.rand(16, 1, generator=g) * 3
    lo, hi = x.amin(1), x.amax(1)
    scale, zp = qparams(lo, hi, 8, symmetric=False)
    ours = fake_quantize(x, scale[:, None], zp[:, None], 0, 255)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), 0, 0, 255)
    # torch multiplies by 1/scale, we divide: they may differ by one step at exact ties only.
    diff = (ours - ref).abs() / scale[:, None]
    assert (diff > 1e-3).float().mean() < 1e-3 and diff.max() <= 1 + 1e-4
    q = quantize_tensor(x, scale[:, None], zp[:, None], 0, 255)
    assert torch.allclose(dequantize(q, scale[:, None], zp[:, None]), ours, atol=1e-6)


def test_ste_gradient_identity_inside_zero_outside():
    scale, zp = torch.tensor(0.1), torch.tensor(0.0)
    x = torch.tensor([-2.0, -0.8, -0.05, 0.0, 0.33, 0.7, 0.75, 5.0], requires_grad=True)
    fake_quantize(x, scale, zp, -8, 7).sum().backward()
    # representable range is [-0.8, 0.7]; 0.75 rounds to 7.5 -> clipped
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_learnable_scale_gets_lsq_gradient():
    scale = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.33, -0.8, 5.0])
    fake_quantize(x, scale, torch.tensor(0.0), -8, 7).sum().backward()
    # LSQ: round(x/s) - x/s inside the range, the clip level outside: (3 - 3.3) + (-8 + 8) + 7
    assert scale.grad.item() == pytest.approx(-0.3 + 0.0 + 7.0, abs=1e-5)


def test_fake_quant_layer_conv_and_activation():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 3, padding=1)
    layer = FakeQuantLayer(conv, WeightQuantizer(8, True, "per_channel"), ActQuantizer(8, False))
    layer.aq.set_range(-3.0, 3.0)
    x = torch.randn(2, 3, 10)
    out = layer(x)
    ref = conv(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    layer.enabled = False
    assert torch.equal(layer(x), ref)


def test_dynamic_activation_uses_batch_range():
    aq = ActQuantizer(8, symmetric=False, dynamic=True)
    x = torch.linspace(-1, 3, 101)
    scale, zp = qparams(x.min(), x.max(), 8, False)
    assert torch.allclose(aq(x), fake_quantize(x, scale, zp, 0, 255))


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 9}, "QuantConfig.bits"), ({"bits": 1}, "QuantConfig.bits"), ({"act_bits": 16}, "QuantConfig.act_bits"),
    ({"granularity": "per_row"}, "QuantConfig.granularity"), ({"calibration": "kl"}, "QuantConfig.calibration"),
    ({"calibration": "percentile", "calibration_param": 30}, "QuantConfig.calibration_param"),
    ({"group_size": 0}, "QuantConfig.group_size"), ({"backend": "tensorrt"}, "QuantConfig.backend"),
    ({"bits": 4, "fallback_bits": 4}, "QuantConfig.fallback_bits"), ({"learnable_scales": True}, "QuantConfig.learnable_scales"),
])
def test_bad_config_is_one_line_error(kwargs, field):
    with pytest.raises(ConfigError) as err:
        QuantConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg


def test_group_size_must_divide_every_layer():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ConfigError, match="group_size: 48 does not divide layer '0' input size 64"):
        validate_for_model(QuantConfig(granularity="per_group", group_size=48), model)
    validate_for_model(QuantConfig(granularity="per_group", group_size=16), model)  # 64 and 32: fine
    validate_for_model(QuantConfig(granularity="per_group", group_size=64, layers={"exclude": ["2"]}), model)  # skipped layer

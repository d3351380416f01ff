"""Fake quantization: quantize -> dequantize in float, with a straight-through estimator (STE).

Conventions (shared with the real backends through ``QuantizedWeights``):
- symmetric b-bit: integers in [-2^(b-1), 2^(b-1)-1], zero point 0, scale = max|x| / (2^(b-1)-1);
- asymmetric b-bit: integers in [0, 2^b-1], scale = (hi - lo) / (2^b-1) with lo <= 0 <= hi,
  zero point = round(-lo / scale) (so real 0 is exactly representable, as padding needs).
- weight scales are per tensor, per output channel, or per group of ``group_size`` consecutive
  weights feeding one output (the layout int4 kernels use).

Written by hand rather than with ``torch.fake_quantize_per_channel_affine`` because per-group
scales need arbitrary broadcasting and learnable scales need a gradient w.r.t. the scale (LSQ,
Esser et al. 2020), which torch only offers as a private op; tests check both agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .observers import observe
from .qmath import EPS, dequantize, fake_quantize, qparams, qrange, quantize_tensor  # noqa: F401 - re-exported


def grad_scaled(t: torch.Tensor, g: float) -> torch.Tensor:
    """t in the forward pass, gradient multiplied by g in the backward pass (LSQ step-size scaling).

    LSQ uses g = 1/sqrt(N * Qp) (N = weights per scale, or features per sample for activations)
    so that under SGD a step size moves, relative to itself, about as fast as its weights. Adam
    cancels any constant g; qat.param_groups sets the scales' learning rate for that case."""
    return (t - t * g).detach() + t * g


def rows_view(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """2-D view of w whose rows each share one scale."""
    if granularity == "per_tensor":
        return w.reshape(1, -1)
    if granularity == "per_channel":
        return w.reshape(w.shape[0], -1)
    return w.reshape(-1, group_size)


def scale_shape(w: torch.Tensor, granularity: str, group_size: int) -> tuple[int, ...]:
    """Shape of the scale tensor handed to backends: (), (out,), or (out, in / group_size)."""
    if granularity == "per_tensor":
        return ()
    if granularity == "per_channel":
        return (w.shape[0],)
    return (w.shape[0], w[0].numel() // group_size)


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight tensor with scales from an observer (recomputed while training
    unless the scales are learnable)."""

    #: ONNX Runtime's 7-bit weights (qrange); set per layer by ptq.wrap when the backend uses them
    reduce_range: bool = False

    def __init__(self, bits: int, symmetric: bool = True, granularity: str = "per_channel",
                 group_size: int = 128, observer: str = "minmax"):
        super().__init__()
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.group_size, self.observer = group_size, observer
        self.register_buffer("scale", torch.ones(1, 1))
        self.register_buffer("zero_point", torch.zeros(1, 1))
        self.learnable = False

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return qrange(self.bits, self.symmetric, self.reduce_range)

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        lo, hi = observe(rows_view(w, self.granularity, self.group_size), self.observer, self.bits, self.symmetric,
                         reduce_range=self.reduce_range)
        scale, zp = qparams(lo, hi, self.bits, self.symmetric, self.reduce_range)
        if self.learnable:
            self.scale.data = scale[:, None].clone()
        else:
            self.scale = scale[:, None].clone()
        self.zero_point = zp[:, None].clone()

    def make_learnable(self) -> None:
        """Turn the scale into a Parameter (LSQ); calibrate first. The calibrated scale is the
        init (not LSQ's 2<|w|>/sqrt(Qp), which is coarser than max|w|/Qp here; see qat.py)."""
        if not self.learnable:
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)
            self.learnable = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training and not self.learnable:
            self.calibrate(w)
        rows = rows_view(w, self.granularity, self.group_size)
        scale = self.scale
        if self.learnable:
            scale = grad_scaled(scale, 1.0 / math.sqrt(rows.shape[1] * self.qmin_qmax[1]))
        return fake_quantize(rows, scale, self.zero_point, *self.qmin_qmax).reshape(w.shape)

    @torch.no_grad()
    def integer_weights(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integers shaped like w, scale, zero_point shaped by ``scale_shape``)."""
        q = quantize_tensor(rows_view(w, self.granularity, self.group_size), self.scale, self.zero_point, *self.qmin_qmax)
        shape = scale_shape(w, self.granularity, self.group_size)
        return q.reshape(w.shape), self.scale.detach().reshape(shape).clone(), self.zero_point.reshape(shape).to(torch.int32)


class ActQuantizer(nn.Module):
    """Per-tensor fake quantization of a layer's input: fixed calibrated range ("static") or the
    range of each batch ("dynamic")."""

    def __init__(self, bits: int = 8, symmetric: bool = False, dynamic: bool = False):
        super().__init__()
        self.bits, self.symmetric, self.dynamic = bits, symmetric, dynamic
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.learnable = False

    def set_range(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        scale, zp = qparams(torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32), self.bits, self.symmetric)
        self.scale.data = scale.to(self.scale.device).reshape(())
        self.zero_point = zp.to(self.zero_point.device).reshape(())

    def make_learnable(self) -> None:
        if not self.learnable and not self.dynamic:
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)
            self.learnable = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits, self.symmetric)
        if self.dynamic:
            d = x.detach()
            scale, zp = qparams(d.min(), d.max(), self.bits, self.symmetric)
            return fake_quantize(x, scale, zp, qmin, qmax)
        scale = self.scale
        if self.learnable:
            scale = grad_scaled(scale, 1.0 / math.sqrt(x[0].numel() * qmax))
        return fake_quantize(x, scale, self.zero_point, qmin, qmax)


class FakeQuantLayer(nn.Module):
    """A Linear or ConvNd whose weight (and optionally input) is fake-quantized.

    ``enabled = False`` runs the wrapped float layer unchanged (mixed precision toggles this);
    ``input_divisor`` (SmoothQuant) divides the input per channel before activation quantization
    — the weight was multiplied by the same factors, so the float product is unchanged.
    """

    def __init__(self, layer: nn.Module, wq: WeightQuantizer, aq: ActQuantizer | None = None):
        super().__init__()
        self.layer, self.wq, self.aq = layer, wq, aq
        self.enabled = True
        self.register_buffer("input_divisor", None)
        wq.calibrate(layer.weight)

    def quantized_weight(self) -> torch.Tensor:
        return self.wq(self.layer.weight)

    # Code that reads a layer's tensors directly instead of calling it (nn.TransformerEncoder's
    # fast-path checks, Hugging Face ViT's ``projection.weight.dtype``) sees what the simulation
    # computes with: the fake-quantized weight (float when disabled) and the float bias.
    @property
    def weight(self) -> torch.Tensor:
        return self.quantized_weight() if self.enabled else self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.layer(x if self.input_divisor is None else x / self._divisor(x))
        if self.input_divisor is not None:
            x = x / self._divisor(x)
        if self.aq is not None:
            x = self.aq(x)
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)

    def _divisor(self, x: torch.Tensor) -> torch.Tensor:
        d = self.input_divisor
        if isinstance(self.layer, nn.Linear):
            return d
        return d.reshape(-1, *([1] * (x.dim() - 2)))  # channels first for convs

    def extra_repr(self) -> str:
        aq = "none" if self.aq is None else f"{self.aq.bits}b {'dynamic' if self.aq.dynamic else 'static'}"
        return f"weights={self.wq.bits}b {self.wq.granularity}, act={aq}, enabled={self.enabled}"


# Names the issue uses; one class serves both layer kinds.
FakeQuantLinear = FakeQuantLayer
FakeQuantConv = FakeQuantLayer

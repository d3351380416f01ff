"""The integer grid of a quantizer: ranges, scales and zero points, quantize / dequantize,
fake-quantize with a straight-through estimator. A leaf module: fake.py (the quantizer
modules) and observers.py (range search) both build on it without importing each other.
Conventions: see fake.py's docstring."""

from __future__ import annotations

import torch

EPS = 1e-8  # smallest scale, so an all-zero channel does not divide by zero


def qrange(bits: int, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range of a b-bit quantizer. ``reduce_range`` (8-bit only) is ONNX Runtime's:
    int8 in [-64, 64], uint8 in [0, 127], so that a pair of u8*s8 products fits the saturating
    int16 of x86 kernels without VNNI (see isa_plan.py)."""
    if reduce_range and bits == 8:
        return (-64, 64) if symmetric else (0, 127)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
            reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) covering [lo, hi] (elementwise; zero point as a float holding an integer)."""
    qmin, qmax = qrange(bits, symmetric, reduce_range)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / qmax).clamp_min(EPS), torch.zeros_like(amax)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integers clamp(round(x / scale) + zero_point) as int32 (round half to even, like torch)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q.to(scale.dtype) - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """dequantize(quantize(x)) with STE: d/dx = 1 inside [qmin, qmax], 0 where clipped; the
    scale gets the LSQ gradient when it requires grad."""
    zero_point = zero_point.detach()
    v = x / scale + zero_point
    v = v + (torch.round(v) - v).detach()  # round with identity gradient
    return (torch.clamp(v, qmin, qmax) - zero_point) * scale

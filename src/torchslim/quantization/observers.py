"""Range observers: choose the clipping range (lo, hi) that a uniform quantizer will cover.

One interface, ``observe(samples, method, bits, symmetric, param) -> (lo, hi)``. ``samples`` is
1-D (one range) or 2-D ``(rows, n)`` (one range per row: per-channel / per-group weights).
Each method is one small function:

- minmax: the exact extremes (no clipping).
- percentile: the p-th percentile of |x| (symmetric) or the (100-p, p) percentiles.
- mse: the clipping ratio of the min/max range, searched on a grid, that minimises the squared
  quantization error of the samples themselves (no Gaussian/Laplace assumption, unlike ACIQ).
- entropy: TensorRT's KL-divergence calibration on a histogram of |x| (or of x, shifted, when
  asymmetric): pick the threshold whose 2^(bits-1)-bin quantized histogram is closest to the
  clipped reference histogram.

torch.ao's observers only cover 8-bit min/max and a histogram L2 search and hold state in
modules; these are stateless functions over a sample, so every bit width shares them.
"""

from __future__ import annotations

import numpy as np
import torch

from . import qmath


def _rows(samples: torch.Tensor) -> torch.Tensor:
    x = samples.detach().float()
    return x.reshape(1, -1) if x.dim() <= 1 else x.reshape(x.shape[0], -1)


def _ret(lo: torch.Tensor, hi: torch.Tensor, samples: torch.Tensor):
    if samples.dim() <= 1:
        return lo.reshape(()), hi.reshape(())
    return lo, hi


def minmax(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    if symmetric:
        hi = torch.maximum(lo.abs(), hi.abs())
        lo = -hi
    return lo, hi


def percentile(x: torch.Tensor, symmetric: bool, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-interpolated percentiles (numpy's default), per row."""
    q = p / 100.0
    if symmetric:
        hi = _quantile(x.abs(), q)
        return -hi, hi
    return _quantile(x, 1.0 - q), _quantile(x, q)


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    # torch.quantile refuses inputs over 2**24 elements; sort-based kthvalue has no such limit.
    n = x.shape[1]
    pos = q * (n - 1)
    lo_i, frac = int(np.floor(pos)), pos - np.floor(pos)
    srt = x.sort(dim=1).values
    hi_i = min(lo_i + 1, n - 1)
    return srt[:, lo_i] + frac * (srt[:, hi_i] - srt[:, lo_i])


def mse(x: torch.Tensor, symmetric: bool, bits: int, grid: int = 100,
        reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range ratio r in {1/grid, ..., 1} of min/max minimising sum (fq(x) - x)^2
    (on the integer grid the quantizer will use: ``reduce_range`` = ONNX Runtime's 7-bit one)."""
    lo0, hi0 = minmax(x, symmetric)
    qmin, qmax = qmath.qrange(bits, symmetric, reduce_range)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for k in range(1, int(grid) + 1):
        r = k / grid
        lo, hi = lo0 * r, hi0 * r
        scale, zp = qmath.qparams(lo, hi, bits, symmetric, reduce_range)
        err = (qmath.fake_quantize(x, scale[:, None], zp[:, None], qmin, qmax) - x).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def entropy(x: torch.Tensor, symmetric: bool, bits: int, bins: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-style KL calibration per row (rows are handled one at a time: it is for activations)."""
    los, his = [], []
    for row in x:
        lo, hi = _entropy_row(row.cpu().numpy().astype(np.float64), symmetric, bits, int(bins))
        los.append(lo)
        his.append(hi)
    return torch.tensor(los, device=x.device), torch.tensor(his, device=x.device)


def _entropy_row(v: np.ndarray, symmetric: bool, bits: int, bins: int) -> tuple[float, float]:
    # Asymmetric: histogram distances from the minimum (keeps the low end, clips the high end).
    base = 0.0 if symmetric else float(v.min())
    mag = np.abs(v) if symmetric else v - base
    top = float(mag.max())
    if top == 0.0:
        return (base, base) if not symmetric else (0.0, 0.0)
    hist, edges = np.histogram(mag, bins=bins, range=(0.0, top))
    levels = 2 ** (bits - 1) if symmetric else 2**bits
    best_kl, best_i = np.inf, bins
    for i in range(levels, bins + 1):
        kl = _kl_at(hist, i, levels)
        if kl < best_kl:
            best_kl, best_i = kl, i
    thr = float(edges[best_i]) if best_i < bins else top
    return (-thr, thr) if symmetric else (base, base + thr)


def _kl_at(hist: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q): P = first i bins with the tail folded into bin i-1; Q = those bins merged into
    ``levels`` and spread back over P's non-empty bins (TensorRT). A bin where Q is empty but P
    is not (the folded tail) gets Q = 1e-12 instead of an infinite divergence."""
    p = hist[:i].astype(np.float64).copy()
    p[-1] += hist[i:].sum()
    nonzero = p > 0
    ids = (np.arange(i) * levels) // i
    sums = np.bincount(ids, weights=hist[:i], minlength=levels)
    counts = np.bincount(ids, weights=nonzero, minlength=levels)
    q = np.where(nonzero, sums[ids] / np.maximum(counts[ids], 1), 0.0)
    p, q = p[nonzero] / p.sum(), q[nonzero] / max(q.sum(), 1e-300)
    return float(np.sum(p * np.log(p / np.maximum(q, 1e-12))))


def observe(samples: torch.Tensor, method: str = "minmax", bits: int = 8, symmetric: bool = False,
            param: float | None = None, reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of samples by ``method``; scalars for 1-D samples, per-row vectors for 2-D.
    ``reduce_range``: the range will be quantized on ONNX Runtime's 7-bit grid (qmath.qrange);
    only the MSE search depends on it."""
    x = _rows(samples)
    if method == "minmax":
        lo, hi = minmax(x, symmetric)
    elif method == "percentile":
        lo, hi = percentile(x, symmetric, 99.99 if param is None else float(param))
    elif method == "mse":
        lo, hi = mse(x, symmetric, bits, 100 if param is None else int(param), reduce_range)
    elif method == "entropy":
        lo, hi = entropy(x, symmetric, bits, 2048 if param is None else int(param))
    else:
        raise ValueError(f"unknown observer {method!r}")
    return _ret(lo, hi, samples)

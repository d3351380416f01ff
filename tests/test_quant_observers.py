"""Calibration observers on distributions whose optimum is known or brute-forced."""

import numpy as np
import pytest
import torch

from torchslim.quantization.fake import fake_quantize, qparams, qrange
from torchslim.quantization.observers import observe


def _sq_err(x, lo, hi, bits, symmetric):
    scale, zp = qparams(torch.as_tensor(lo), torch.as_tensor(hi), bits, symmetric)
    return (fake_quantize(x, scale, zp, *qrange(bits, symmetric)) - x).pow(2).sum().item()


def test_minmax_is_exact():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3 + 1
    lo, hi = observe(x, "minmax", symmetric=False)
    assert lo.item() == x.min().item() and hi.item() == x.max().item()
    lo, hi = observe(x, "minmax", symmetric=True)
    assert hi.item() == x.abs().max().item() and lo.item() == -hi.item()
    rows = x.reshape(10, 100)
    lo, hi = observe(rows, "minmax", symmetric=False)
    assert torch.equal(lo, rows.amin(1)) and torch.equal(hi, rows.amax(1))


def test_percentile_on_known_sample():
    x = torch.arange(10001, dtype=torch.float32)  # 0..10000: the p-th percentile is 100 * p
    lo, hi = observe(x, "percentile", symmetric=False, param=99.0)
    assert (lo.item(), hi.item()) == (100.0, 9900.0)
    lo, hi = observe(x, "percentile", symmetric=False, param=99.995)  # interpolated: 9999.5
    assert hi.item() == pytest.approx(np.percentile(x.numpy(), 99.995), abs=1e-3)
    sym = torch.cat([-x, x])
    lo, hi = observe(sym, "percentile", symmetric=True, param=90.0)
    assert hi.item() == pytest.approx(np.percentile(sym.abs().numpy(), 90.0), rel=1e-6) and lo.item() == -hi.item()


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
@pytest.mark.parametrize("bits", [3, 4])
def test_mse_clipping_matches_brute_force(dist, bits):
    g = torch.Generator().manual_seed(0)
    if dist == "gaussian":
        x = torch.randn(10000, generator=g)
    else:
        x = torch.distributions.Laplace(0.0, 1.0).sample((10000,))
    lo, hi = observe(x, "mse", bits=bits, symmetric=True, param=100)
    ours = _sq_err(x, lo, hi, bits, True)
    amax = x.abs().max().item()
    grid = np.linspace(0.05, 1.0, 500) * amax  # 5x finer than the observer's grid
    c = torch.tensor(grid, dtype=torch.float32)[:, None]  # all candidates at once
    scale, zp = qparams(-c, c, bits, True)
    errs = (fake_quantize(x[None], scale, zp, *qrange(bits, True)) - x[None]).pow(2).sum(1).tolist()
    best = grid[int(np.argmin(errs))]
    assert ours <= min(errs) * 1.01  # within 1% of the brute-force optimum
    assert hi.item() == pytest.approx(best, rel=0.1)
    assert hi.item() < 0.8 * amax  # it really clips (min/max would not)


def test_entropy_is_sane():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50000, generator=g)
    lo, hi = observe(x, "entropy", bits=8, symmetric=True, param=2048)
    # 8-bit KL thresholds on a Gaussian clip a little below the extreme sample (~4.3 sigma here)
    assert 2.5 < hi.item() <= x.abs().max().item() and lo.item() == -hi.item()
    outliers = torch.cat([x, torch.tensor([100.0, -80.0])])
    lo, hi = observe(outliers, "entropy", bits=8, symmetric=True, param=2048)
    assert hi.item() < 10  # two outliers do not stretch the range; min/max would give 100
    relu = x.clamp_min(0)
    lo, hi = observe(relu, "entropy", bits=8, symmetric=False, param=2048)
    # half the mass sits in the zero bin; KL then clips harder (here ~2.25 sigma) but keeps the bulk
    assert lo.item() == 0.0 and 1.5 < hi.item() < relu.max().item()
    # the chosen range beats min/max on squared error at 4 bits for the outlier sample
    lo4, hi4 = observe(outliers, "entropy", bits=4, symmetric=True, param=512)
    assert _sq_err(outliers, lo4, hi4, 4, True) < _sq_err(outliers, torch.tensor(-100.0), torch.tensor(100.0), 4, True)

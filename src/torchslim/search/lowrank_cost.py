"""What low-rank factorization and weight sharing cost: factorized models, stored bytes, latency.

Counting runs on the real thing: ``factorize`` applies ``lowrank.factorize_layers`` (the stage's
own truncated SVD, at the ranks ``SearchSpace.ranks_of`` gives) to the materialized copy, so
parameters, non-zeros and MACs are those of the model the ``lowrank`` stage builds.

Latency of a factorized layer is priced as ``table_time(layer at its widths) * f(share)``: f is
the time of the factorized pair (``Conv(c_in, r, k) -> Conv(r, c_out, 1)``, or two Linears) over
the dense layer's, both at the layer's full widths, timed in the same interleaved round-robin as
the latency table (``pair_candidates``). It is stored in the layer's table entry
(``tables[layer]["lowrank"] = {"shares": [...], "factor": [...]}``), so ``cost.json`` carries it
and a resumed search that reloads ``tables`` reads it back. Using the factor measured at full
widths at narrower widths is an approximation (and the whole-model calibration curve was fitted
on unfactorized models): the end-to-end check of a chosen policy (``verify.py``, which times the
materialized, really factorized model) corrects it.

Share bits do not change latency: a shared weight is decoded to float once (ONNX constant
folding, or at load time) and runs on the same dense kernels. An eager model keeps the
parametrization and re-decodes the weight (one gather of its size) per forward; that small
overhead is not priced.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.measure import count_nonzeros
from .space import Policy, SearchSpace, factor_rank

QUANTIZED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what an int8 stage quantizes (QUANTIZABLE)


def factorize(model: nn.Module, space: SearchSpace, policy: Policy, example: Any) -> None:
    """Factorize ``model`` (already at the policy's widths) in place, as the ``lowrank`` stage
    of ``policy.to_stages`` does."""
    from ..lowrank import LowRankConfig, factorize_layers

    ranks = space.ranks_of(policy)
    if ranks:
        cfg = LowRankConfig(rank=ranks, layers=list(ranks), min_mac_saving=0.0, min_saved_macs=0)
        factorize_layers(model, cfg, example)


def mac_factor(space: SearchSpace, policy: Policy) -> dict[str, float]:
    """layer -> MACs of its factorized pair / MACs of the dense layer at the same widths,
    ``r * (c_in*k + c_out) / (c_in*k * c_out)`` (lowrank's ``macs_after / macs_before``)."""
    widths = space.factor_widths(policy.keep)
    out = {}
    for layer, r in space.ranks_of(policy).items():
        c_in, c_out, k = widths[layer]
        out[layer] = r * (c_in * k + c_out) / (c_in * k * c_out)
    return out


def weight_bytes(model: nn.Module, space: SearchSpace, policy: Policy) -> int:
    """Stored weight bytes of ``model`` (the policy's materialized copy): every non-zero at 4
    bytes (fp32), except an int8 layer's weight at 1 byte per non-zero and a shared layer's at
    ``ceil(non-zeros * bits / 8)`` plus its ``2**bits`` fp32 codebook. A factorized layer's two
    factors stay float (``SearchSpace.float_layers``)."""
    total = 4 * count_nonzeros(model)
    floats = set(space.float_layers(policy) or ())
    factorized = space.ranks_of(policy)
    mods = dict(model.named_modules())
    for name in space.layers:
        mod = mods.get(name)
        if name in factorized or mod is None or not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        nz = int(torch.count_nonzero(mod.weight.detach()))
        if name in policy.share:
            bits = int(policy.share[name])
            total += math.ceil(nz * bits / 8) + 2**bits * 4 - 4 * nz
        elif policy.keep_float is not None and name not in floats and isinstance(mod, QUANTIZED):
            total += nz - 4 * nz
    return int(total)


def _pair_like(mod: nn.Module, r: int) -> nn.Module:
    """The two thin layers ``lowrank`` replaces ``mod`` by at rank ``r`` (values irrelevant)."""
    bias = mod.bias is not None
    if isinstance(mod, nn.Linear):
        return nn.Sequential(nn.Linear(mod.in_features, r, bias=False), nn.Linear(r, mod.out_features, bias=bias))
    conv = type(mod)
    return nn.Sequential(conv(mod.in_channels, r, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                              dilation=mod.dilation, bias=False, padding_mode=mod.padding_mode),
                         conv(r, mod.out_channels, 1, bias=bias))


def pair_candidates(space: SearchSpace, keys: dict[str, tuple], layouts: dict[tuple, tuple], xs: dict[tuple, torch.Tensor]
                    ) -> tuple[dict[str, Any], dict[int, list[tuple[float, str, str]]]]:
    """(timing candidates, layout index -> [(share, pair candidate, dense candidate)]): one pair
    per (layout of a factorizable layer, rank share), at the layout's full widths; the dense
    candidate is the table's own full-width entry (``k:c_inxc_out``), in the same round-robin."""
    wanted = {keys[n] for n in space.shapes if n in keys}
    cands: dict[str, Any] = {}
    plan: dict[int, list[tuple[float, str, str]]] = {}
    for k, (key, (mod, ins, outs, batch, spatial)) in enumerate(layouts.items()):
        if key not in wanted or not space.ranks:
            continue
        c_in, c_out = ins[-1], outs[-1]
        x = xs[(batch, c_in, spatial)]
        fan_in = mod.weight[0].numel()
        for share in space.ranks:
            r = factor_rank(share, fan_in, c_out)
            if r is None:
                continue
            torch.manual_seed(0)
            pair = _pair_like(mod, r).eval()
            name = f"{k}:lowrank{share}"
            cands[name] = (lambda pair=pair, x=x: pair(x))
            plan.setdefault(k, []).append((float(share), name, f"{k}:{c_in}x{c_out}"))
    return cands, plan


def pair_factors(res: dict[str, dict[str, float]], basis: str, plan: dict[int, list[tuple[float, str, str]]]
                 ) -> dict[int, dict[str, list[float]]]:
    """layout index -> {"shares": [...], "factor": [pair time / dense time]}."""
    return {k: {"shares": [s for s, _, _ in rows], "factor": [res[p][basis] / res[d][basis] for _, p, d in rows]}
            for k, rows in plan.items()}


def time_factor(table: dict[str, Any] | None, share: float) -> float:
    """f(share) of one layer's table entry: the measured factor (interpolated between measured
    shares, held at the ends); 1 where none was measured (no latency table, or ranks off)."""
    lr = (table or {}).get("lowrank")
    if not lr or not lr["shares"]:
        return 1.0
    order = np.argsort(lr["shares"])
    return float(np.interp(share, np.asarray(lr["shares"])[order], np.asarray(lr["factor"])[order]))


def interp(t: dict[str, Any], kind: str, ci: int, co: int) -> float:
    """A table's time (grid ``t[kind]``) at widths ``ci`` x ``co``, bilinearly interpolated."""
    ms = np.asarray(t[kind])  # rows: input widths, columns: output widths
    row = [float(np.interp(co, t["out"], ms[i])) for i in range(len(t["in"]))]
    return float(np.interp(ci, t["in"], row))

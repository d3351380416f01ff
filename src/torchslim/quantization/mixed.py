"""Accuracy-aware mixed precision: keep the most sensitive layers at higher precision / float.

1. Measure the float metric; the bound is metric >= max(float - max_drop, min_metric).
2. Quantize every layer; if the bound holds, that is the plan.
3. Sensitivity of a layer = float metric - metric with only that layer quantized.
4. Raise layers to ``fallback_bits`` (then, if that is not enough, to float) in order of
   sensitivity; the number raised is found by bisection (log2(n) evaluations, assuming more
   raised layers never hurt), and the chosen point is one that was actually measured.

The search only sees two callables, ``set_bits(layer, bits | None)`` and ``evaluate()``, so it
works for any model the caller can re-quantize per layer (simulated here, real by a backend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class LayerChoice:
    """One line of a plan: the layer, its weight bits (None = float) and its sensitivity."""

    layer: str
    bits: int | None
    sensitivity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "bits": "float" if self.bits is None else self.bits, "sensitivity": self.sensitivity}


def search_plan(
    default_bits: dict[str, int],
    set_bits: Callable[[str, int | None], None],
    evaluate: Callable[[], float],
    max_drop: float | None = None,
    min_metric: float | None = None,
    fallback_bits: int | None = None,
) -> tuple[list[LayerChoice], dict[str, Any]]:
    """Return (plan, info); leaves the model set to the plan."""
    names = list(default_bits)
    n_evals = 0

    def measure(bits: dict[str, int | None]) -> float:
        nonlocal n_evals
        for name in names:
            set_bits(name, bits[name])
        n_evals += 1
        return float(evaluate())

    float_metric = measure({n: None for n in names})
    target = max(float_metric - (max_drop if max_drop is not None else float("inf")),
                 min_metric if min_metric is not None else float("-inf"))
    full = measure(dict(default_bits))
    info: dict[str, Any] = {"float_metric": float_metric, "target": target, "all_quantized_metric": full}
    sens = {n: None for n in names}
    chosen, metric = dict(default_bits), full
    if full < target:
        for name in names:
            sens[name] = float_metric - measure({m: (default_bits[m] if m == name else None) for m in names})
        order = sorted(names, key=lambda n: sens[n], reverse=True)
        chosen, metric = _raise_until(order, dict(default_bits), fallback_bits, target, measure, full)
    plan = [LayerChoice(n, chosen[n], sens[n]) for n in names]
    for name in names:  # leave the model set to the plan
        set_bits(name, chosen[name])
    info.update(final_metric=metric, bound_met=metric >= target, evaluations=n_evals,
                float_layers=sum(c.bits is None for c in plan))
    return plan, info


def _raise_until(order, base, fallback_bits, target, measure, base_metric):
    """Raise the first k layers of ``order`` (to fallback_bits, then float) for the least k that
    meets target; fall back to the best measured point when none does."""
    steps = ([fallback_bits] if fallback_bits is not None else []) + [None]
    for level in steps:
        def plan_k(k: int, level=level, base=base) -> dict[str, int | None]:
            p = dict(base)
            for n in order[:k]:
                p[n] = level
            return p

        everything = measure(plan_k(len(order)))
        if everything < target:
            if level is None:  # even all-float misses (only possible with min_metric)
                return plan_k(len(order)), everything
            base, base_metric = plan_k(len(order)), everything  # all at fallback, go on to float
            continue
        lo, hi, hi_metric = 0, len(order), everything  # invariant: k = hi meets target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            m = measure(plan_k(mid))
            if m >= target:
                hi, hi_metric = mid, m
            else:
                lo = mid
        return plan_k(hi), hi_metric
    return base, base_metric

"""Budgets, and the rule-based policy makers (uniform, sensitivity-proportional, user rules).

Every policy maker's proposal passes through ``fit_budget``: the proposal is scaled (its
proportions kept) to the widest policy that meets the budget, as AMC clips its agent's actions
so the budget always holds. So every maker spends the same budget, and comparisons between
makers are at equal cost.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.errors import check
from ..core.task import Task
from ..pruning.sensitivity import sensitivity
from ..pruning.unstructured import PruneConfig
from .space import Policy, SearchSpace

KINDS = ("latency", "macs", "nonzeros")


@dataclass(frozen=True)
class Budget:
    """kind: "latency" (measured table), "macs" (exact) or "nonzeros" (exact, fp32 bytes / 4);
    ratio: the most the compressed model may cost, as a share of the unpruned model (0, 1]."""

    kind: str = "latency"
    ratio: float = 0.5

    def __post_init__(self) -> None:
        check(self.kind in KINDS, "Budget.kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        check(isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0, "Budget.ratio",
              f"must be a share in (0, 1], e.g. 0.5 for latency: 0.5x; got {self.ratio!r}")


CostFn = Callable[[Policy], float]  # policy -> its cost as a share of the unpruned model


def _bisect(family: Callable[[float], Policy], cost: CostFn, ratio: float, hi: float, iters: int = 24) -> tuple[Policy, bool]:
    """family(a): cost decreasing in a in [0, hi]; the smallest a (widest policy) within ratio."""
    if cost(family(0.0)) <= ratio:
        return family(0.0), True
    if cost(family(hi)) > ratio:
        return family(hi), False
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(family(mid)) <= ratio else (mid, hi)
    return family(hi), True


def fit_budget(raw: Policy, space: SearchSpace, cost: CostFn, ratio: float) -> tuple[Policy, bool]:
    """Scale raw's keep ratios together (proportions kept, clipped to [keep_min, 1]) to the
    widest policy within ``ratio``; (policy, feasible). Sparsity and keep-float pass through."""
    top = max([raw.keep.get(r, 1.0) for r in space.roots] + [1e-6])

    def family(a: float) -> Policy:
        s = 1.0 - a
        keep = {r: raw.keep.get(r, 1.0) / top * s for r in space.roots}
        return space.clip(Policy(keep, raw.sparsity, raw.keep_float, raw.granularity))

    return _bisect(family, cost, ratio, 1.0)


def weighted(weights: dict[str, float], space: SearchSpace, cost: CostFn, ratio: float,
             base: Policy | None = None) -> tuple[Policy, bool]:
    """Prune group g by a * weights[g] (keep = 1 - a * w), a as small as the budget allows."""
    w = {r: max(float(weights.get(r, 1.0)), 1e-9) for r in space.roots}
    hi = (1.0 - space.keep_min) / min(w.values()) + 1e-9
    base = base or Policy()

    def family(a: float) -> Policy:
        return space.clip(Policy({r: 1.0 - a * w[r] for r in space.roots}, base.sparsity, base.keep_float, base.granularity))

    return _bisect(family, cost, ratio, hi)


def uniform(space: SearchSpace, cost: CostFn, ratio: float) -> tuple[Policy, bool]:
    """The same keep ratio for every group, the largest within budget."""
    return weighted({r: 1.0 for r in space.roots}, space, cost, ratio)


def group_sensitivity(model: nn.Module, task: Task, space: SearchSpace, sparsity: float = 0.8,
                      split: str = "val") -> dict[str, float]:
    """Per group: the largest metric drop of one of its layers pruned alone to ``sparsity``
    (``prune.sensitivity``'s analysis, magnitude criterion); the model is unchanged."""
    layers = sorted({m for g in space.groups for m in g.members})
    cfg = PruneConfig(layers={"include": tuple(layers), "types": ("Conv1d", "Conv2d", "Conv3d", "Linear")})
    rows = sensitivity(model, task, sparsities=(sparsity,), config=cfg, split=split)
    drop = {r["layer"].removesuffix(".weight"): max(float(r["drop"]), 0.0) for r in rows}
    return {g.root: max(drop.get(m, 0.0) for m in g.members) for g in space.groups}


def sensitivity_rule(sens: dict[str, float], space: SearchSpace, cost: CostFn, ratio: float,
                     eps: float = 0.01) -> tuple[Policy, bool]:
    """Prune each group in inverse proportion to its sensitivity (+eps so an insensitive group
    is not the only one pruned), to the budget."""
    inv = {r: 1.0 / (sens.get(r, 0.0) + eps) for r in space.roots}
    mean = sum(inv.values()) / max(len(inv), 1)
    return weighted({r: v / mean for r, v in inv.items()}, space, cost, ratio)


def user_rules(rules: list[dict[str, Any]], space: SearchSpace, cost: CostFn, ratio: float) -> tuple[Policy, bool]:
    """Rules from a recipe, first match wins per group: ``{match: "layers.3.*", weight: 2.0}``
    (prune that group twice as hard), ``{match: "stem.*", keep: 1.0}`` (fixed keep ratio,
    left alone by the budget fit). Position rules are patterns too ("layers.0.*")."""
    weights: dict[str, float] = {}
    fixed: dict[str, float] = {}
    for g in space.groups:
        for i, rule in enumerate(rules):
            check(isinstance(rule, dict) and isinstance(rule.get("match"), str) and
                  (("weight" in rule) != ("keep" in rule)), f"rules[{i}]",
                  "each rule is {match: PATTERN, weight: W} or {match: PATTERN, keep: K}")
            if any(fnmatch.fnmatchcase(m, rule["match"]) for m in (g.root, *g.members)):
                if "keep" in rule:
                    check(0 < float(rule["keep"]) <= 1, f"rules[{i}].keep", f"must be in (0, 1], got {rule['keep']!r}")
                    fixed[g.root] = float(rule["keep"])
                else:
                    check(0 <= float(rule["weight"]) <= 100, f"rules[{i}].weight", f"must be in [0, 100], got {rule['weight']!r}")
                    weights[g.root] = float(rule["weight"])
                break
    free = [r for r in space.roots if r not in fixed]
    w = {r: weights.get(r, 1.0) for r in free}

    def fixed_cost(p: Policy) -> float:
        return cost(Policy({**p.keep, **fixed}, p.sparsity, p.keep_float, p.granularity))

    sub = SearchSpace([g for g in space.groups if g.root in free], space.layers, space.classifier,
                      space.keep_min, space.sparsities, space.int8, space.step, space.int8_backend)
    pol, ok = weighted(w, sub, fixed_cost, ratio)
    return space.clip(Policy({**pol.keep, **fixed})), ok

"""Budgets, and the rule-based policy makers (uniform, sensitivity-proportional, user rules).

Every policy maker's proposal passes through ``fit_budget``: the proposal is scaled (its
proportions kept) to the widest policy that meets the budget, as AMC clips its agent's actions
so the budget always holds. So every maker spends the same budget, and comparisons between
makers are at equal cost.

Bit widths (``SearchSpace.int8``): every rule's policy then carries an int8 stage that quantizes
every layer (``keep_float = ()``) with per-channel weight scales, except the layers a user rule
keeps float (``bits: 32``). The keep ratios are fitted to the budget at int8's price (the ONNX
Runtime int8 table of ``int8_cost``), so where int8 is cheaper an int8 policy keeps more channels
than the float one at the same budget. The sensitivity rule keeps every layer int8: an int8
sensitivity per layer would cost one quantized evaluation per layer (an ONNX Runtime graph each),
so the per-layer bit width is left to the makers that measure it (the RL agent, Optuna).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
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
BITS = (8, 32)  # a user rule's bit width: 8 = int8, 32 = the layer stays float
RULE_KEYS = ("match", "weight", "keep", "bits")
GRANULARITY = "per_channel"  # the rules' int8 weight scales (the accurate one; Optuna searches both)


@dataclass(frozen=True)
class Budget:
    """kind: "latency" (measured table), "macs" (exact) or "nonzeros" (a size budget, exact:
    stored weight bytes, fp32 4 bytes per non-zero, int8 1, a shared layer its index bits plus
    codebook; for a float policy without sharing the old fp32 non-zeros ratio exactly);
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
    widest policy within ``ratio``; (policy, feasible). Sparsity, keep-float, ranks and share bits
    pass through."""
    top = max([raw.keep.get(r, 1.0) for r in space.roots] + [1e-6])

    def family(a: float) -> Policy:
        s = 1.0 - a
        keep = {r: raw.keep.get(r, 1.0) / top * s for r in space.roots}
        return space.clip(Policy(keep, raw.sparsity, raw.keep_float, raw.granularity, raw.rank, raw.share))

    return _bisect(family, cost, ratio, 1.0)


def weighted(weights: dict[str, float], space: SearchSpace, cost: CostFn, ratio: float,
             base: Policy | None = None) -> tuple[Policy, bool]:
    """Prune group g by a * weights[g] (keep = 1 - a * w), a as small as the budget allows."""
    w = {r: max(float(weights.get(r, 1.0)), 1e-9) for r in space.roots}
    hi = (1.0 - space.keep_min) / min(w.values(), default=1.0) + 1e-9
    base = base or int8_base(space)

    def family(a: float) -> Policy:
        return space.clip(Policy({r: 1.0 - a * w[r] for r in space.roots}, base.sparsity, base.keep_float, base.granularity,
                                 base.rank, base.share))

    return _bisect(family, cost, ratio, hi)


def int8_base(space: SearchSpace) -> Policy:
    """What every rule starts from: with ``space.int8`` every layer int8 at per-channel
    granularity (``keep_float = ()``); without it no int8 stage (``keep_float = None``)."""
    return Policy({}, {}, (), GRANULARITY) if space.int8 else Policy()


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
    is not the only one pruned), to the budget. With ``space.int8`` every layer is int8 (module
    doc: no per-layer int8 sensitivity is measured), so the fit keeps more channels where int8
    is cheaper."""
    inv = {r: 1.0 / (sens.get(r, 0.0) + eps) for r in space.roots}
    mean = sum(inv.values()) / max(len(inv), 1)
    return weighted({r: v / mean for r, v in inv.items()}, space, cost, ratio)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rules(rules: Any, int8: bool, where: str = "") -> None:
    """Each user rule's shape and values, before any work; errors name ``{where}rules[i].<key>``."""
    check(isinstance(rules, list), f"{where}rules", "must be a list of {match: PATTERN, ...} rules")
    for i, rule in enumerate(rules):
        at = f"{where}rules[{i}]"
        check(isinstance(rule, dict) and isinstance(rule.get("match"), str), at,
              "each rule is {match: PATTERN} with weight: W or keep: K, and/or bits: 8 | 32")
        extra = sorted(set(rule) - set(RULE_KEYS))
        check(not extra, at, f"unknown key {', '.join(map(repr, extra))} — a rule takes match, weight or keep, and bits")
        check(not ("weight" in rule and "keep" in rule), at, "give weight: W or keep: K, not both")
        check(any(k in rule for k in ("weight", "keep", "bits")), at, "give weight: W, keep: K or bits: 8 | 32")
        if "keep" in rule:
            check(_number(rule["keep"]) and 0 < rule["keep"] <= 1, f"{at}.keep", f"must be in (0, 1], got {rule['keep']!r}")
        if "weight" in rule:
            check(_number(rule["weight"]) and 0 <= rule["weight"] <= 100, f"{at}.weight",
                  f"must be in [0, 100], got {rule['weight']!r}")
        if "bits" in rule:
            check(not isinstance(rule["bits"], bool) and rule["bits"] in BITS, f"{at}.bits",
                  f"must be 8 (int8) or 32 (kept float), got {rule['bits']!r}")
            check(int8, f"{at}.bits", "bit widths are searched only with search.int8: true — set it, or drop bits")


def user_rules(rules: list[dict[str, Any]], space: SearchSpace, cost: CostFn, ratio: float) -> tuple[Policy, bool]:
    """Rules from a recipe: ``{match: "layers.3.*", weight: 2.0}`` (prune that group twice as
    hard), ``{match: "stem.*", keep: 1.0}`` (fixed keep ratio, left alone by the budget fit) —
    the first such rule matching a group's root or members wins — and, with ``space.int8``,
    ``{match: "fc", bits: 32}`` (keep the matching layers float; ``bits: 8``: int8, the default)
    — the first rule with ``bits`` matching a layer's name wins; a rule may carry both kinds.
    Position rules are patterns too ("layers.0.*")."""
    check_rules(rules, space.int8)
    weights: dict[str, float] = {}
    fixed: dict[str, float] = {}
    for g in space.groups:
        for rule in rules:
            if ("weight" in rule or "keep" in rule) and any(fnmatch.fnmatchcase(m, rule["match"]) for m in (g.root, *g.members)):
                if "keep" in rule:
                    fixed[g.root] = float(rule["keep"])
                else:
                    weights[g.root] = float(rule["weight"])
                break
    base = int8_base(space)
    if space.int8:
        bits = {n: next((r["bits"] for r in rules if "bits" in r and fnmatch.fnmatchcase(n, r["match"])), 8)
                for n in space.layers}
        base = Policy({}, {}, tuple(n for n in space.layers if bits[n] == 32), GRANULARITY)
    free = [r for r in space.roots if r not in fixed]
    w = {r: weights.get(r, 1.0) for r in free}

    def fixed_cost(p: Policy) -> float:
        return cost(Policy({**p.keep, **fixed}, p.sparsity, p.keep_float, p.granularity, p.rank, p.share))

    sub = dataclasses.replace(space, groups=[g for g in space.groups if g.root in free])
    pol, ok = weighted(w, sub, fixed_cost, ratio, base)
    return space.clip(Policy({**pol.keep, **fixed}, {}, pol.keep_float, pol.granularity, pol.rank, pol.share)), ok

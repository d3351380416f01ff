"""One interface for every policy maker: ``Evaluator(raw policy) -> trial record``.

The evaluator fits the raw proposal to the budget (``rules.fit_budget``), writes it as recipe
stages (``policy.to_stages``), runs them on the trained model the way ``torchslim run`` does
(``policy.evaluate``: structured pruning, sparsity, a short fine-tune) and returns a record:
the policy, val and test metric, predicted latency ratio, exact MACs ratio, parameters and
non-zeros, seconds. The objective is the *val* metric; test is reported, never optimized.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..task import Task
from . import policy as policy_mod
from .cost import CostModel
from .rules import Budget, fit_budget
from .space import Policy, SearchSpace


@dataclass
class Evaluator:
    model: nn.Module
    task: Task
    space: SearchSpace
    cost_model: CostModel
    budget: Budget
    base_recipe: dict[str, Any]          # task, model (+weights), seed, measure: no stages
    finetune: dict[str, Any] | None      # TrainConfig fields of the per-policy fine-tune
    log: Callable[[str], None] = print
    trials: list[dict[str, Any]] = field(default_factory=list)
    _cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    _base_nonzeros: int | None = None

    def cost(self, p: Policy) -> float:
        """The budgeted quantity of p as a share of the unpruned model's."""
        if self.budget.kind == "latency":
            return self.cost_model.cost(p)["latency_ratio"]
        if self.budget.kind == "macs":
            return self.cost_model.cost(p)["macs_ratio"]
        example = self.task.example_inputs(batch_size=1)
        if self._base_nonzeros is None:
            self._base_nonzeros = self.cost_model.counts(self.model, Policy(), example)["nonzeros"]
        return self.cost_model.counts(self.model, p, example)["nonzeros"] / self._base_nonzeros

    def fit(self, raw: Policy) -> tuple[Policy, bool]:
        return fit_budget(self.space.clip(raw), self.space, self.cost, self.budget.ratio)

    def recipe(self, p: Policy) -> dict[str, Any]:
        return policy_mod.to_recipe(p, self.space, self.base_recipe, self.finetune)

    def __call__(self, raw: Policy, maker: str = "", fitted: bool = False) -> dict[str, Any]:
        p, feasible = (raw, True) if fitted else self.fit(raw)
        p = self.space.canonical(p)
        key = p.key()
        if key in self._cache:  # same policy again: same numbers (the run is deterministic)
            rec = dict(self._cache[key], maker=maker, cached=True, index=len(self.trials))
            self.trials.append(rec)
            return rec
        t0 = time.perf_counter()
        _, metrics = policy_mod.evaluate(self.model, self.recipe(p), self.task)
        c = self.cost_model.cost(p)
        counts = self.cost_model.counts(self.model, p, self.task.example_inputs(batch_size=1))
        rec = {"index": len(self.trials), "maker": maker, "policy": p.to_dict(), "feasible": feasible,
               "val": metrics["val"], "test": metrics["test"], **c, **counts,
               "seconds": round(time.perf_counter() - t0, 3), "cached": False}
        self._cache[key] = rec
        self.trials.append(rec)
        self.log(f"trial {rec['index']:3d} [{maker}] val {rec['val']:.4f} test {rec['test']:.4f} "
                 f"latency {c.get('latency_ratio', float('nan')):.3f}x macs {c['macs_ratio']:.3f}x "
                 f"({rec['seconds']:.1f}s)")
        return rec


def best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest val metric among feasible trials (ties: the cheaper, then the earlier)."""
    ok = [t for t in trials if t.get("feasible", True)]
    return max(ok, key=lambda t: (t["val"], -t.get("latency_ratio", t["macs_ratio"]), -t["index"]), default=None)


def pareto(trials: list[dict[str, Any]], cost_key: str = "latency_ratio") -> list[dict[str, Any]]:
    """Trials no other trial beats on both val metric (higher) and cost (lower)."""
    pts = [t for t in trials if cost_key in t and not t.get("cached")]
    front = [t for t in pts if not any((o["val"] >= t["val"] and o[cost_key] <= t[cost_key]) and
                                       (o["val"] > t["val"] or o[cost_key] < t[cost_key]) for o in pts)]
    return sorted(front, key=lambda t: t[cost_key])

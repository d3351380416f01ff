"""Exit policies and their calibration.

A policy decides, from one exit head's logits, which rows may stop there:

- ``maxprob`` (BranchyNet-style softmax confidence): exit when max softmax >= threshold;
- ``entropy`` (BranchyNet): exit when the softmax entropy divided by log(classes) <= threshold;
- ``patience`` (PABEE, Zhou et al. 2020): exit when the argmax has been the same at
  ``threshold`` consecutive exits (this one included).

``exit_mask`` is the one rule: the model's forward (eager and TorchScript) and the offline
simulation used for calibration both call it, so a calibrated threshold means on held-out data
exactly what it meant on the val split. Calibration is a sweep over thresholds on the val split's
logits of every head (one pass of the whole network), choosing the cheapest threshold whose
accuracy stays within the bound, or the most accurate one within a cost budget.
"""

from __future__ import annotations

import math
from typing import Any

import torch

POLICIES = {"maxprob": 0, "entropy": 1, "patience": 2}
NEVER = 1e9  # a threshold no row reaches: maxprob >= 1e9, entropy <= -1e9 (sign flipped), patience >= 1e9


def exit_mask(logits: torch.Tensor, policy: int, threshold: float, prev: torch.Tensor,
              streak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows that exit here, this head's argmax (patience; else prev unchanged), updated
    patience streak). TorchScript-able.

    prev / streak: the previous head's argmax and the current streak per row (patience only;
    pass any tensors otherwise)."""
    if policy == 0:
        conf = torch.softmax(logits.float(), dim=-1).amax(dim=-1)
        return conf >= threshold, prev, streak
    if policy == 1:
        logp = torch.log_softmax(logits.float(), dim=-1)
        ent = -(logp.exp() * logp).sum(dim=-1) / math.log(max(logits.shape[-1], 2))
        return ent <= threshold, prev, streak
    pred = logits.argmax(dim=-1)
    streak = torch.where(pred == prev, streak + 1, torch.ones_like(streak))
    return streak.to(torch.float32) >= threshold, pred, streak


def exit_one(logits: torch.Tensor, policy: int, threshold: float) -> bool:
    """exit_mask's decision for a batch of one row (maxprob / entropy) as a Python bool, in two
    or three ops instead of five: at batch 1 the test is a visible share of a small block.
    threshold must be float32-exact (``thresholds.float().tolist()``) so that comparing in
    double gives exit_mask's float32 comparison."""
    if policy == 0:
        return float(torch.softmax(logits.float(), dim=-1).max()) >= threshold
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1) / math.log(max(logits.shape[-1], 2))
    return float(ent[0]) <= threshold


def simulate(logits: torch.Tensor, policy: str, threshold: float | list[float]) -> torch.Tensor:
    """Exit index per row for stacked head logits (E+1, N, C), the last entry the final head
    (the model's loop, one exit at a time; Sweep computes the same in one go)."""
    code = POLICIES[policy]
    n_exits, n = logits.shape[0] - 1, logits.shape[1]
    ts = _as_list(threshold, n_exits)
    where = torch.full((n,), n_exits, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    prev = torch.full((n,), -1, dtype=torch.long)
    streak = torch.zeros(n, dtype=torch.long)
    for i in range(n_exits):
        done, prev, streak = exit_mask(logits[i], code, ts[i], prev, streak)
        now = done & alive
        where[now] = i
        alive &= ~done
    return where


def _as_list(threshold: float | list[float], n_exits: int) -> list[float]:
    return [float(t) for t in threshold] if isinstance(threshold, (list, tuple)) else [float(threshold)] * n_exits


class Sweep:
    """Offline evaluation of many thresholds on fixed (E+1, N, C) head logits: every head's
    score (max softmax / entropy / patience streak, computed as exit_mask computes it) and
    correctness once, then each threshold vector costs a few comparisons."""

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor, policy: str, cum_cost: torch.Tensor):
        code = POLICIES[policy]
        self.n_exits, n = logits.shape[0] - 1, logits.shape[1]
        self.flip = code == 1  # entropy exits at or below the threshold
        prev = torch.full((n,), -1, dtype=torch.long)
        streak = torch.zeros(n, dtype=torch.long)
        scores = []
        for i in range(self.n_exits):
            if code == 0:
                scores.append(torch.softmax(logits[i].float(), dim=-1).amax(dim=-1))
            elif code == 1:
                logp = torch.log_softmax(logits[i].float(), dim=-1)
                scores.append(-(logp.exp() * logp).sum(dim=-1) / math.log(max(logits.shape[-1], 2)))
            else:
                _, prev, streak = exit_mask(logits[i], code, 0.0, prev, streak)
                scores.append(streak.to(torch.float32))
        self.scores = torch.stack(scores) if scores else torch.empty(0, n)
        self.correct = logits.argmax(-1) == targets.view(1, -1)  # (E+1, N)
        self.cum_cost = cum_cost.to(torch.float64)

    def where(self, threshold: float | list[float]) -> torch.Tensor:
        ts = torch.tensor(_as_list(threshold, self.n_exits), dtype=torch.float32).view(-1, 1)
        hits = (self.scores <= ts) if self.flip else (self.scores >= ts)
        full = torch.full((self.scores.shape[1],), self.n_exits, dtype=torch.long)
        if self.n_exits == 0:
            return full
        return torch.where(hits.any(0), hits.to(torch.uint8).argmax(0), full)  # the first head that hits

    def evaluate(self, threshold: float | list[float]) -> dict[str, Any]:
        where = self.where(threshold)
        counts = torch.bincount(where, minlength=self.n_exits + 1)
        acc = self.correct.gather(0, where.view(1, -1)).float().mean()
        return {"accuracy": float(acc), "mean_cost": float(self.cum_cost[where].mean()),
                "exit_rates": (counts.float() / max(len(where), 1)).tolist()}


def evaluate_threshold(logits: torch.Tensor, targets: torch.Tensor, policy: str, threshold: float | list[float],
                       cum_cost: torch.Tensor) -> dict[str, Any]:
    """Accuracy, mean cost and exit rates of one threshold (or one per exit) on (E+1, N, C) logits."""
    return Sweep(logits, targets, policy, cum_cost).evaluate(threshold)


def threshold_grid(policy: str, n_exits: int) -> list[float]:
    """Candidate thresholds, from most aggressive (exits most) to never exiting early."""
    if policy == "maxprob":
        fine = [1 - 10 ** (-k / 4) for k in range(1, 25)]  # 0.44 ... 0.999999: the useful end is near 1
        return sorted(set([round(0.1 * k, 2) for k in range(1, 10)] + fine)) + [NEVER]
    if policy == "entropy":
        fine = [10 ** (-k / 4) for k in range(1, 25)]
        return sorted(set([round(0.1 * k, 2) for k in range(1, 10)] + fine), reverse=True) + [-NEVER]
    return [float(p) for p in range(1, n_exits + 1)] + [NEVER]


def calibrate(logits: torch.Tensor, targets: torch.Tensor, policy: str, cum_cost: torch.Tensor,
              accuracy_drop: float, latency_budget: float | None, reference_accuracy: float | None = None,
              per_exit: bool = False) -> dict[str, Any]:
    """Choose the threshold; return it with the whole accuracy-vs-cost curve.

    accuracy bound: the cheapest threshold whose val accuracy >= reference_accuracy (the
    original model's val accuracy; default: the final head's) - accuracy_drop; when none
    reaches it, the most accurate one, flagged ``budget_met=False``. latency budget (fraction
    of the full cost): the most accurate threshold whose mean cost <= budget (the cheapest one
    if none fits, flagged ``budget_met=False``)."""
    full_acc = float((logits[-1].argmax(-1) == targets).float().mean())
    ref = full_acc if reference_accuracy is None else reference_accuracy
    grid = threshold_grid(policy, logits.shape[0] - 1)
    sweep = Sweep(logits, targets, policy, cum_cost)
    rows = [{"threshold": t, **sweep.evaluate(t)} for t in grid]
    if latency_budget is None:
        ok = [r for r in rows if r["accuracy"] >= ref - accuracy_drop - 1e-12]
        met = bool(ok)
        best = min(ok, key=lambda r: (r["mean_cost"], -r["accuracy"])) if ok else max(rows, key=lambda r: (r["accuracy"], -r["mean_cost"]))
    else:
        budget = latency_budget * float(cum_cost[-1])
        ok = [r for r in rows if r["mean_cost"] <= budget]
        met = bool(ok)
        best = max(ok, key=lambda r: (r["accuracy"], -r["mean_cost"])) if ok else min(rows, key=lambda r: r["mean_cost"])
    thresholds = [best["threshold"]] * (logits.shape[0] - 1)
    if per_exit and met and len(thresholds) > 1:
        floor = ref - accuracy_drop - 1e-12
        budget = None if latency_budget is None else latency_budget * float(cum_cost[-1])
        thresholds, best = _refine(sweep, grid, thresholds, best, floor, budget)
    return {"threshold": best["threshold"], "thresholds": thresholds, "val_accuracy": best["accuracy"],
            "full_val_accuracy": full_acc, "reference_val_accuracy": ref,
            "mean_cost": best["mean_cost"], "exit_rates": best["exit_rates"], "budget_met": met, "curve": rows}


def _refine(sweep: Sweep, grid: list[float], thresholds: list[float], best: dict[str, Any], floor: float,
            budget: float | None, passes: int = 3) -> tuple[list[float], dict[str, Any]]:
    """Coordinate descent over one threshold per exit: accuracy bound -> lower mean cost with
    val accuracy >= floor; latency budget -> higher accuracy with mean cost <= budget."""
    def better(r: dict[str, Any], cur: dict[str, Any]) -> bool:
        if budget is None:
            return r["accuracy"] >= floor and (r["mean_cost"], -r["accuracy"]) < (cur["mean_cost"], -cur["accuracy"])
        return r["mean_cost"] <= budget and (r["accuracy"], -r["mean_cost"]) > (cur["accuracy"], -cur["mean_cost"])

    ts, cur = list(thresholds), dict(best)
    for _ in range(passes):
        moved = False
        for i in range(len(ts)):
            for t in grid:
                trial = ts[:i] + [t] + ts[i + 1:]
                r = sweep.evaluate(trial)
                if better(r, cur):
                    ts, cur, moved = trial, {**r, "threshold": cur["threshold"]}, True
        if not moved:
            break
    return ts, cur

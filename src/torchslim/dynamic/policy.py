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


def simulate(logits: torch.Tensor, policy: str, threshold: float) -> torch.Tensor:
    """Exit index per row for stacked head logits (E+1, N, C), the last entry the final head."""
    code = POLICIES[policy]
    n_exits, n = logits.shape[0] - 1, logits.shape[1]
    where = torch.full((n,), n_exits, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    prev = torch.full((n,), -1, dtype=torch.long)
    streak = torch.zeros(n, dtype=torch.long)
    for i in range(n_exits):
        done, prev, streak = exit_mask(logits[i], code, threshold, prev, streak)
        now = done & alive
        where[now] = i
        alive &= ~done
    return where


def evaluate_threshold(logits: torch.Tensor, targets: torch.Tensor, policy: str, threshold: float,
                       cum_cost: torch.Tensor) -> dict[str, Any]:
    """Accuracy, mean cost and exit rates of one threshold on (E+1, N, C) logits."""
    where = simulate(logits, policy, threshold)
    pred = logits.argmax(-1).gather(0, where.view(1, -1)).squeeze(0)
    counts = torch.bincount(where, minlength=logits.shape[0])
    return {"accuracy": float((pred == targets).float().mean()), "mean_cost": float(cum_cost[where].float().mean()),
            "exit_rates": (counts.float() / max(len(where), 1)).tolist()}


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
              accuracy_drop: float, latency_budget: float | None, reference_accuracy: float | None = None) -> dict[str, Any]:
    """Choose the threshold; return it with the whole accuracy-vs-cost curve.

    accuracy bound: the cheapest threshold whose val accuracy >= reference_accuracy (the
    original model's val accuracy; default: the final head's) - accuracy_drop; when none
    reaches it, the most accurate one, flagged ``budget_met=False``. latency budget (fraction
    of the full cost): the most accurate threshold whose mean cost <= budget (the cheapest one
    if none fits, flagged ``budget_met=False``)."""
    full_acc = float((logits[-1].argmax(-1) == targets).float().mean())
    ref = full_acc if reference_accuracy is None else reference_accuracy
    grid = threshold_grid(policy, logits.shape[0] - 1)
    rows = [{"threshold": t, **evaluate_threshold(logits, targets, policy, t, cum_cost)} for t in grid]
    if latency_budget is None:
        ok = [r for r in rows if r["accuracy"] >= ref - accuracy_drop - 1e-12]
        met = bool(ok)
        best = min(ok, key=lambda r: (r["mean_cost"], -r["accuracy"])) if ok else max(rows, key=lambda r: (r["accuracy"], -r["mean_cost"]))
    else:
        budget = latency_budget * float(cum_cost[-1])
        ok = [r for r in rows if r["mean_cost"] <= budget]
        met = bool(ok)
        best = max(ok, key=lambda r: (r["accuracy"], -r["mean_cost"])) if ok else min(rows, key=lambda r: r["mean_cost"])
    return {"threshold": best["threshold"], "val_accuracy": best["accuracy"], "full_val_accuracy": full_acc,
            "reference_val_accuracy": ref,
            "mean_cost": best["mean_cost"], "exit_rates": best["exit_rates"], "budget_met": met, "curve": rows}

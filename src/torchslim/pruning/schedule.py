"""When and how much to prune: one-shot, iterative, gradual (Zhu & Gupta 2017 cubic schedule).

Each schedule gets the pruning target (a PruneConfig: sparsity, scope, criterion, per_layer)
and a fine-tune budget (a TrainConfig: epochs or max_steps), and leaves masks on the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..core.task import Task
from ..core.train import FitResult, TrainConfig, fit
from .importance import score_params
from .masks import MaskKeeper, attach_masks, masks_for_sparsity, masks_of

# the pruning target: unstructured.PruneConfig (not imported: unstructured imports this module)
PruneConfig = Any


def cubic_sparsity(step: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta's s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, held at s_i before t0
    and at s_f after t0 + n dt."""
    if step <= t0:
        return s_i
    frac = min(1.0, (step - t0) / (n * dt))
    return s_f + (s_i - s_f) * (1.0 - frac) ** 3


def total_steps(task: Task, train: TrainConfig) -> int:
    """Optimizer steps the fine-tune budget allows."""
    per_epoch = len(task.split("train"))
    full = train.epochs * per_epoch
    return full if train.max_steps is None else min(full, train.max_steps)


def _targets(cfg: PruneConfig, names: list[str], sparsity: float) -> float | dict[str, float]:
    """The sparsity to ask for now: a number, or per layer (scaled by sparsity / cfg.sparsity)."""
    if not cfg.per_layer:
        return sparsity
    scale = sparsity / cfg.sparsity if cfg.sparsity else 0.0
    return {n: cfg.per_layer.get(n, cfg.per_layer.get(n.rpartition(".")[0], cfg.sparsity)) * scale for n in names}


def prune_to(model: nn.Module, task: Task | None, names: list[str], cfg: PruneConfig, sparsity: float,
             grads: dict[str, torch.Tensor] | None = None) -> None:
    """Score the named weights and mask the lowest so that the target sparsity holds."""
    scores = score_params(model, names, cfg.criterion, task, grads=grads, batches=cfg.batches, seed=cfg.seed)
    current = {n: m for n, m in masks_of(model).items() if n in scores}
    scope = "layer" if cfg.per_layer else cfg.scope
    attach_masks(model, masks_for_sparsity(scores, _targets(cfg, names, sparsity), scope, current))


def finetune(model: nn.Module, task: Task, train: TrainConfig | None, hooks: tuple = ()) -> FitResult | None:
    """fit with masks kept (MaskKeeper re-applies them after every step)."""
    if train is None or total_steps(task, train) == 0:
        return None
    return fit(model, task, train, hooks=[*hooks, MaskKeeper()])


def oneshot(model: nn.Module, task: Task, names: list[str], cfg: PruneConfig) -> dict[str, Any]:
    prune_to(model, task, names, cfg, cfg.sparsity)
    result = finetune(model, task, cfg.finetune)
    return {"fit": [result.to_dict()] if result else []}


def iterative(model: nn.Module, task: Task, names: list[str], cfg: PruneConfig) -> dict[str, Any]:
    """k rounds of prune -> fine-tune; each round removes the same share of what is left
    (kept fraction (1 - s)^(r/k)) and gets 1/k of the fine-tune steps."""
    fits, rounds = [], []
    budget = total_steps(task, cfg.finetune) if cfg.finetune else 0
    from ..core.progress import track

    for r in track(range(1, cfg.iterations + 1), "pruning rounds", total=cfg.iterations):
        s = 1.0 - (1.0 - cfg.sparsity) ** (r / cfg.iterations)
        prune_to(model, task, names, cfg, s)
        steps = budget // cfg.iterations
        if steps:
            per_epoch = len(task.split("train"))
            train = dataclasses.replace(cfg.finetune, max_steps=steps, epochs=math.ceil(steps / per_epoch),
                                        seed=cfg.finetune.seed + r)
            result = finetune(model, task, train)
            fits.append(result.to_dict() if result else None)
        rounds.append(s)
    return {"round_sparsities": rounds, "fit": fits}


class GradualPruner:
    """fit() hook for gradual magnitude pruning: every ``dt`` steps from ``t0`` for ``n`` updates,
    re-score the weights and raise sparsity along the cubic schedule; in between, keep masks."""

    def __init__(self, names: list[str], cfg: PruneConfig, t0: int, n: int, dt: int):
        self.names, self.cfg, self.t0, self.n, self.dt = names, cfg, t0, n, dt
        self.log: list[tuple[int, float]] = []

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.cfg.initial_sparsity, self.cfg.sparsity, self.t0, self.n, self.dt)

    def is_update(self, step: int) -> bool:
        k, r = divmod(step - self.t0, self.dt)
        return step >= self.t0 and r == 0 and k <= self.n

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.is_update(step):
            params = dict(model.named_parameters())
            grads = {n: params[n].grad for n in self.names if params[n].grad is not None}
            s = self.sparsity_at(step)
            prune_to(model, None, self.names, self.cfg, s, grads=grads or None)
            self.log.append((step, s))
            from ..core.progress import note

            note(f"sparsity {s:.0%} (pruning update {(step - self.t0) // self.dt}/{self.n})")
        else:
            MaskKeeper().after_step(model, step)


def gradual(model: nn.Module, task: Task, names: list[str], cfg: PruneConfig) -> dict[str, Any]:
    """Prune during the fine-tune budget: updates from gradual_start to gradual_end (fractions of
    the steps), ``gradual_updates`` of them; the remaining steps fine-tune at the final sparsity."""
    steps = total_steps(task, cfg.finetune)
    t0 = int(cfg.gradual_start * steps)
    n = cfg.gradual_updates
    dt = max(1, (int(cfg.gradual_end * steps) - t0) // n)
    if cfg.initial_sparsity > 0:
        prune_to(model, task, names, cfg, cfg.initial_sparsity)
    pruner = GradualPruner(names, cfg, t0, n, dt)
    result = fit(model, task, cfg.finetune, hooks=[pruner])
    if not pruner.log or pruner.log[-1][1] < cfg.sparsity:  # budget too short to reach the end
        prune_to(model, task, names, cfg, cfg.sparsity)
        pruner.log.append((steps, cfg.sparsity))
    return {"fit": [result.to_dict()], "t0": t0, "n": n, "dt": dt,
            "schedule_log": [{"step": t, "sparsity": s} for t, s in pruner.log]}

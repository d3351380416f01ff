"""Recovery after pruning: fine-tune, random regrowth, greedy regrowth — until a bound or budget.

Greedy regrowth restores pruned weights to their pre-pruning values where that most reduces the
validation loss. The first-order estimate of the loss change for restoring weight i is
g_i * w_orig_i (g = dL_val/dw at the pruned model, where the pruned weight is 0); the most
negative candidates are restored a chunk at a time and each chunk is kept only if the measured
validation loss really went down (else the next chunk of candidates is tried).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.bounds import bounded, check_bounds, count, fraction, seed_field
from ..core.config_base import config
from ..core.errors import check
from ..core.task import Task, call_model
from ..core.train import TrainConfig
from ..core.utils import eval_mode, model_device, to_device
from .masks import attach_masks, masks_of, param_of, sparsity_of
from .schedule import finetune

METHODS = ("finetune", "random", "greedy")


@config
class RecoveryConfig:
    """method: "finetune" (train with masks kept), "random" or "greedy" regrowth (each round
        optionally followed by ``finetune``).
    min_metric: stop once the val metric reaches this (absolute, e.g. 0.95).
    max_drop: stop once the val metric is within this of the pre-pruning val metric.
    budget: at most this fraction of the pruned weights is regrown in total.
    chunk: weights regrown per round; tries: greedy chunks tried per round; max_rounds: rounds.
    """

    method: str = "finetune"
    finetune: TrainConfig | None = None
    min_metric: float | None = bounded(None, -1e9, 1e9)
    max_drop: float | None = bounded(None, 0, 1e9)
    budget: float = fraction(0.05)
    chunk: int = count(64, 1, 10**9)
    tries: int = count(4, 1, 10_000)
    max_rounds: int = count(20, 1, 100_000)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_bounds(self)
        if isinstance(self.finetune, dict):
            self.finetune = TrainConfig(**self.finetune)
        check(self.method in METHODS, "RecoveryConfig.method", f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        check(self.method != "finetune" or self.finetune is not None, "RecoveryConfig.finetune",
              "method 'finetune' needs a TrainConfig budget")
        check(0.0 <= self.budget <= 1.0, "RecoveryConfig.budget", f"must be in [0, 1], got {self.budget!r}")
        check(self.chunk >= 1 and self.tries >= 1 and self.max_rounds >= 1, "RecoveryConfig.chunk",
              "chunk, tries and max_rounds must be >= 1")


def val_loss_and_grads(model: nn.Module, task: Task, names: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean validation loss and its gradient w.r.t. the named weights (model unchanged)."""
    params = dict(model.named_parameters())
    device, total, count = model_device(model), 0.0, 0
    with eval_mode(model):
        model.zero_grad(set_to_none=True)
        try:
            for inputs, targets in task.split("val"):
                n = len(targets)
                loss = task.loss(call_model(model, to_device(inputs, device)), to_device(targets, device))
                (loss * n).backward()
                total, count = total + loss.item() * n, count + n
            grads = {k: params[k].grad.detach().clone() / count for k in names}
        finally:
            model.zero_grad(set_to_none=True)
    return total / count, grads


@torch.no_grad()
def val_loss(model: nn.Module, task: Task) -> float:
    out, tgt = task.outputs_and_targets(model, "val")
    return float(task.loss(out, tgt))


@torch.no_grad()
def _restore(model: nn.Module, picks: list[tuple[str, torch.Tensor]], originals: dict[str, torch.Tensor], on: bool) -> None:
    """Regrow (on) or re-prune (off) flat positions per parameter."""
    masks = masks_of(model)
    for name, idx in picks:
        p, m = param_of(model, name), masks[name].clone()
        m.view(-1)[idx] = on
        p.view(-1)[idx] = originals[name].to(p.device).view(-1)[idx] if on else 0.0
        attach_masks(model, {name: m}, intersect=False)


def _candidates(model: nn.Module, task: Task, names: list[str], originals, method: str, gen) -> list[tuple[str, int]]:
    """Pruned positions ordered best first (greedy: most negative g*w_orig; random: shuffled)."""
    masks = masks_of(model)
    flat_names, flat_idx, est = [], [], []
    grads = val_loss_and_grads(model, task, names)[1] if method == "greedy" else None
    for name in names:
        pruned = (~masks[name].view(-1)).nonzero().flatten().cpu()
        flat_names += [name] * len(pruned)
        flat_idx.append(pruned)
        if grads is not None:
            g = grads[name].view(-1).cpu()[pruned]
            est.append(g * originals[name].view(-1).cpu()[pruned])
    idx = torch.cat(flat_idx) if flat_idx else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(torch.cat(est)) if grads is not None else torch.randperm(len(idx), generator=gen)
    return [(flat_names[i], int(idx[i])) for i in order.tolist()]


def _group(chunk: list[tuple[str, int]]) -> list[tuple[str, torch.Tensor]]:
    by: dict[str, list[int]] = {}
    for name, i in chunk:
        by.setdefault(name, []).append(i)
    return [(n, torch.tensor(v)) for n, v in by.items()]


def _bound_met(cfg: RecoveryConfig, metric: float, reference: float | None) -> bool:
    if cfg.min_metric is not None and metric >= cfg.min_metric:
        return True
    return cfg.max_drop is not None and reference is not None and reference - metric <= cfg.max_drop


def recover(model: nn.Module, task: Task, names: list[str], cfg: RecoveryConfig,
            originals: dict[str, torch.Tensor], reference: float | None = None) -> dict[str, Any]:
    """Run recovery in place; return the per-round history (val metric, sparsity, regrown)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n_pruned = sum(int((~m).sum()) for k, m in masks_of(model).items() if k in names)
    limit = int(cfg.budget * n_pruned)
    regrown, history = 0, []
    for rnd in range(cfg.max_rounds if cfg.method != "finetune" else 1):
        metric = task.evaluate(model, "val")
        history.append({"round": rnd, "val_metric": metric, "regrown": regrown,
                        "sparsity": sparsity_of({k: v for k, v in masks_of(model).items() if k in names})})
        if _bound_met(cfg, metric, reference) or (cfg.method != "finetune" and regrown >= limit):
            break
        if cfg.method != "finetune":
            got = _regrow_round(model, task, names, cfg, originals, min(cfg.chunk, limit - regrown), gen)
            if got == 0:  # no candidate chunk lowered the validation loss
                break
            regrown += got
        finetune(model, task, cfg.finetune)
    metric = task.evaluate(model, "val")
    return {"method": cfg.method, "regrown": regrown, "val_metric": metric, "bound_met": _bound_met(cfg, metric, reference),
            "history": history}


def _regrow_round(model, task, names, cfg, originals, size, gen) -> int:
    cands = _candidates(model, task, names, originals, cfg.method, gen)
    if cfg.method == "random":
        _restore(model, _group(cands[:size]), originals, on=True)
        return len(cands[:size])
    before = val_loss(model, task)
    for t in range(cfg.tries):
        chunk = _group(cands[t * size:(t + 1) * size])
        if not chunk:
            break
        _restore(model, chunk, originals, on=True)
        if val_loss(model, task) < before:
            return sum(len(i) for _, i in chunk)
        _restore(model, chunk, originals, on=False)
    return 0

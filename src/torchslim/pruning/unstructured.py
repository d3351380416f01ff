"""Unstructured pruning: ``apply(model, PruneConfig(...), task) -> StageResult``.

The model is pruned in place and returned; pruned weights are zero and their masks stay on the
model (see masks.py) so later fine-tuning keeps them, until ``masks.remove(model)``. The saved
form (``StageResult.save``) is the sparse file of export/sparse.py, so the bytes really shrink.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..core.bounds import bounded, check_bounds, count, fraction, seed_field
from ..core.config_base import config
from ..core.errors import ConfigError, check
from ..core.selection import PRUNABLE, Layers, layers_field
from ..core.stage import StageResult, register_stage
from ..core.task import Task
from ..core.train import TrainConfig, fit
from ..export.sparse import save_sparse
from . import schedule as sched
from .importance import CRITERIA
from .masks import attach_masks, layer_records, masks_for_sparsity, masks_of, remove, sparsity_of
from .regrow import RecoveryConfig, recover

SCHEDULES = ("oneshot", "iterative", "gradual", "l1")
SCOPES = ("global", "layer")
DEFAULT_TYPES = PRUNABLE  # the kinds pruned when layers.types is not given
RENAMED_LAYERS = {"layer_types": "layers: {types: [...]}", "include": "layers: {include: [...]}",
                  "exclude": "layers: {exclude: [...]}"}


@config(renamed={**RENAMED_LAYERS, "taylor_batches": "batches"})
class PruneConfig:
    """sparsity: fraction of the selected weights set to zero, in [0, 1).
    criterion: a name in importance.CRITERIA (magnitude, l1, l2, taylor, random).
    scope: "global" (one threshold over all selected layers) or "layer" (each layer alone);
        per_layer ({layer name: sparsity}, e.g. from sensitivity.allocate) overrides both;
        selected layers it does not name get ``sparsity`` (which must then be > 0).
    layers: which modules' ``weight`` is pruned (a LayerSelection: include / exclude globs on
        module names, types = class names, default Linear and Conv1d/2d/3d; see
        torchslim.core.selection). Biases and norms are never pruned.
    schedule: "oneshot" (prune, then fine-tune), "iterative" (``iterations`` rounds of
        prune -> fine-tune), "gradual" (cubic schedule during fine-tune, from
        ``initial_sparsity`` at ``gradual_start`` to ``sparsity`` at ``gradual_end``, fractions
        of the fine-tune steps, in ``gradual_updates`` steps), "l1" (train with
        ``finetune.l1 > 0``, then zero |w| < ``threshold`` or the smallest to ``sparsity``).
    finetune: the fine-tune budget (TrainConfig: epochs or max_steps); recovery: RecoveryConfig.
    keep_masks: leave masks on the model (False: bake them in with masks.remove).
    """

    sparsity: float = fraction(0.5, high_open=True)
    criterion: str = "magnitude"
    scope: str = "global"
    per_layer: dict[str, float] | None = None
    layers: Layers = layers_field()
    schedule: str = "oneshot"
    finetune: TrainConfig | None = None
    iterations: int = count(3, 1, 10_000)
    initial_sparsity: float = fraction(0.0, high_open=True)
    gradual_start: float = fraction(0.0)
    gradual_end: float = fraction(0.5)
    gradual_updates: int = count(20, 1, 10**6)
    threshold: float | None = bounded(None, 0, 1e9)
    batches: int = count(4, 1, 100_000)
    recovery: RecoveryConfig | None = None
    keep_masks: bool = True
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_bounds(self)
        if isinstance(self.finetune, dict):
            self.finetune = TrainConfig(**self.finetune)
        if isinstance(self.recovery, dict):
            self.recovery = RecoveryConfig(**self.recovery)
        _in01 = lambda v: isinstance(v, (int, float)) and 0.0 <= v < 1.0
        check(_in01(self.sparsity), "PruneConfig.sparsity", f"must be in [0, 1), got {self.sparsity!r}")
        check(self.criterion in CRITERIA, "PruneConfig.criterion",
              f"unknown criterion {self.criterion!r}; use one of {', '.join(sorted(CRITERIA))}")
        check(self.scope in SCOPES, "PruneConfig.scope", f"must be 'global' or 'layer', got {self.scope!r}")
        check(self.schedule in SCHEDULES, "PruneConfig.schedule", f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        check(all(_in01(v) for v in (self.per_layer or {}).values()), "PruneConfig.per_layer", "every sparsity must be in [0, 1)")
        # schedules scale per_layer by (sparsity now / sparsity): at sparsity 0 that pruned
        # nothing at all, silently
        check(not self.per_layer or self.sparsity > 0, "PruneConfig.sparsity",
              "must be > 0 with per_layer (schedules scale the per-layer targets by it; selected layers "
              "per_layer does not name get it): set it, e.g., to the largest per_layer value")
        needs_ft = self.schedule in ("iterative", "gradual", "l1")
        check(not needs_ft or self.finetune is not None, "PruneConfig.finetune",
              f"schedule {self.schedule!r} needs a fine-tune budget, e.g. finetune=TrainConfig(epochs=10)")
        check(self.schedule != "l1" or self.finetune.l1 > 0, "PruneConfig.finetune",
              "schedule 'l1' needs finetune=TrainConfig(l1=...) with l1 > 0")
        check(self.iterations >= 1, "PruneConfig.iterations", f"must be >= 1, got {self.iterations!r}")
        check(0.0 <= self.initial_sparsity <= self.sparsity, "PruneConfig.initial_sparsity", "must be in [0, sparsity]")
        check(0.0 <= self.gradual_start < self.gradual_end <= 1.0, "PruneConfig.gradual_end",
              "need 0 <= gradual_start < gradual_end <= 1 (fractions of the fine-tune steps)")
        check(self.gradual_updates >= 1 and self.batches >= 1, "PruneConfig.gradual_updates",
              "gradual_updates and batches must be >= 1")
        check(self.threshold is None or self.threshold >= 0, "PruneConfig.threshold", "must be >= 0 or None")


def _shared_params(model: nn.Module) -> set[int]:
    """ids of parameters reachable from more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def select_layers(model: nn.Module, cfg: PruneConfig) -> tuple[list[str], list[str]]:
    """(weights to prune, modules skipped because they cannot be handled). ConfigError if empty."""
    shared, names, skipped = _shared_params(model), [], []
    for mname, m in model.named_modules():
        if not cfg.layers.named(mname):
            continue
        shown = mname or "<root>"
        own = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
        if cfg.layers.kind_ok(m, mname, DEFAULT_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter):
            if id(m.weight) in shared:
                skipped.append(f"{shown} (tied weight)")
            else:
                names.append(f"{mname}.weight" if mname else "weight")
        elif isinstance(m, nn.RNNBase):
            skipped.append(f"{shown} ({type(m).__name__}: recurrent weights are not pruned)")
        elif own:
            why = "not in layers.types" if cfg.layers.filter_fn is None else "not in layers.types or refused by layers.filter_fn"
            skipped.append(f"{shown} ({type(m).__name__}: {why})")
    if not names:
        from torch.nn.utils import parametrize

        shared = [n for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]
        check(not shared, "PruneConfig", f"{(shared or [''])[0]!r} holds a parametrized (e.g. shared) weight; prune before "
              "weight sharing in the recipe (sharing keeps the zeros of a pruned model)")
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))})
        types = list(cfg.layers.types or DEFAULT_TYPES)
        raise ConfigError(f"PruneConfig.layers: no layer selected ({cfg.layers.describe()}, types={types}); "
                          f"the model has {kinds}")
    unknown = [n for n in (cfg.per_layer or {}) if n not in names and f"{n}.weight" not in names]
    check(not unknown, "PruneConfig.per_layer", f"names {unknown} are not selected layers; selected: {names}")
    return names, skipped


def _l1_then_threshold(model: nn.Module, task: Task, names: list[str], cfg: PruneConfig) -> dict[str, Any]:
    """Sparsify by L1-regularised training, then zero small weights (threshold or to sparsity)."""
    result = fit(model, task, cfg.finetune)
    params = dict(model.named_parameters())
    if cfg.threshold is not None:
        masks = {n: params[n].detach().abs() >= cfg.threshold for n in names}
    else:
        scores = {n: params[n].detach().abs() for n in names}
        masks = masks_for_sparsity(scores, sched._targets(cfg, names, cfg.sparsity), "layer" if cfg.per_layer else cfg.scope)
    attach_masks(model, masks)
    return {"fit": [result.to_dict()]}


RUNNERS = {"oneshot": sched.oneshot, "iterative": sched.iterative, "gradual": sched.gradual, "l1": _l1_then_threshold}


def prune_model(model: nn.Module, cfg: PruneConfig, task: Task) -> tuple[nn.Module, dict[str, Any]]:
    """Prune model in place following cfg; return it and the record of what changed."""
    names, skipped = select_layers(model, cfg)
    check(cfg.recovery is None or task.val is not None, "PruneConfig.recovery",
          f"needs a validation split; task {task.name!r} has none")
    if skipped:
        warnings.warn(f"pruning skipped layers it cannot handle: {', '.join(skipped)}", stacklevel=2)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    reference = task.evaluate(model, "val") if cfg.recovery is not None and task.val is not None else None
    info: dict[str, Any] = {"schedule": cfg.schedule, "target_sparsity": cfg.sparsity, "skipped": skipped}
    info.update(RUNNERS[cfg.schedule](model, task, names, cfg))
    if cfg.recovery is not None:
        info["recovery"] = recover(model, task, names, cfg.recovery, originals, reference)
    info["sparsity"] = sparsity_of({k: v for k, v in masks_of(model).items() if k in names})
    info["layers"] = layer_records(model, names)
    if not cfg.keep_masks:
        remove(model)
    return model, info


@register_stage(PruneConfig)
def apply(model: nn.Module, config: PruneConfig, task: Task) -> StageResult:
    """Stage entry point: prune, and save with the compact sparse format."""
    model, info = prune_model(model, config, task)
    return StageResult(model, info, save=save_sparse)


def weight_sparsity(model: nn.Module, names: list[str] | None = None) -> float:
    """Fraction of exact zeros in the named (default: all >= 2-D) weights."""
    params = [p for n, p in model.named_parameters() if (names is None and p.dim() >= 2) or (names and n in names)]
    total = sum(p.numel() for p in params)
    return 1.0 - sum(int(torch.count_nonzero(p)) for p in params) / total if total else 0.0

"""early_exit(model, ExitConfig, task): exit heads after chosen blocks, trained and calibrated.

Steps: cut a copy of the backbone into segments after the chosen blocks (split.py), put a small
head after each cut, train the heads (``mode="joint"``: backbone and heads together on
final loss + head_weight · Σ head losses, as BranchyNet; ``mode="distill"``: backbone frozen,
heads learn the final head's soft outputs with the Hinton KD loss of ``torchslim.distill``, as
FastBERT's self-distillation), then calibrate one threshold of the policy on the val split
(policy.py) and store it in the model's buffers. The returned EarlyExitModel really skips.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import field
from typing import Any

import torch
from torch import nn

from ..core.config_base import config
from ..core.errors import ConfigError, check
from ..core.losses import kd_loss
from ..core.measure.latency import count_macs
from ..core.selection import Layers, layers_field
from ..core.stage import StageResult, register_stage, training_hooks
from ..core.task import Task
from ..core.train import TrainConfig, fit
from ..core.utils import eval_mode, model_device, seed_everything, to_device
from .hf_bert import build_bert, is_bert_classifier
from .model import EarlyExitModel, ExitHead
from .policy import NEVER, POLICIES, calibrate, evaluate_threshold
from .split import feature_shapes, split

MODES = ("joint", "distill")


def _num(v: Any, name: str, low: float, high: float, low_open: bool = False, owner: str = "ExitConfig") -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and v <= high
    check(ok, f"{owner}.{name}", f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {v!r}")


@config(renamed={"include": "layers: {include: [...]}", "exclude": "layers: {exclude: [...]}"}, stage="early_exit")
class ExitConfig:
    """Where exits go, how they learn, when a sample leaves.

    layers: which blocks get an exit (a LayerSelection: include / exclude glob patterns over
        block names, the children of nn.Sequential/ModuleList containers such as ``layers.0``,
        transformer layers such as ``encoder.layers.2``); an exit goes after every selected
        block except the last block. ``types`` / ``filter_fn`` are not used for exits.
    policy: "maxprob" | "entropy" | "patience" (see policy.py).
    accuracy_drop: calibrate for val accuracy >= the given model's val accuracy - accuracy_drop
        (a fraction: 0.005 = 0.5 pt; ``info["budget_met"]`` False when even running every block
        does not reach it, e.g. a fine-tune that hurt the final head); or latency_budget: mean cost as a fraction of the full
        model's MACs, in (0, 1] (then the most accurate threshold within it).
    per_exit_thresholds: after the sweep of one shared threshold, refine one threshold per exit
        (coordinate descent on val under the same bound); off by default: on B10 it saved ~1% of
        the cost and fitted val more closely than the test split followed.
    mode: "joint" (train backbone + heads) or "distill" (frozen backbone, heads distilled from
        the final head with temperature and alpha: alpha·KD + (1 - alpha)·task loss).
    head_weight: weight of each head's loss in joint mode; head_hidden: hidden width of a head
        (0 = one Linear after pooling); head_bins: positions a conv map is pooled to per
        spatial dim before the head's Linear (1 = global average).
    finetune: the training budget; None = leave the heads as built (e.g. to load a state dict).
    """

    layers: Layers = layers_field()
    policy: str = "maxprob"
    accuracy_drop: float = 0.005
    latency_budget: float | None = None
    per_exit_thresholds: bool = False
    mode: str = "joint"
    head_weight: float = 1.0
    head_hidden: int = 0
    head_bins: int = 4
    temperature: float = 2.0
    alpha: float = 0.5
    finetune: TrainConfig | None = field(default_factory=lambda: TrainConfig(epochs=5, lr=1e-3))
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.finetune, dict):
            self.finetune = TrainConfig(**self.finetune)
        check(self.layers.types is None and self.layers.filter_fn is None, "ExitConfig.layers",
              "exits are placed by block name only: give include / exclude patterns, not types or filter_fn")
        check(self.policy in POLICIES, "ExitConfig.policy", f"unknown policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        check(self.mode in MODES, "ExitConfig.mode", f"unknown mode {self.mode!r}; use 'joint' or 'distill'")
        _num(self.accuracy_drop, "accuracy_drop", 0.0, 1.0)
        self.latency_budget is None or _num(self.latency_budget, "latency_budget", 0.0, 1.0, low_open=True)
        _num(self.head_weight, "head_weight", 0.0, 100.0)
        _num(self.temperature, "temperature", 0.0, 100.0, low_open=True)
        _num(self.alpha, "alpha", 0.0, 1.0)
        ok = isinstance(self.head_hidden, int) and not isinstance(self.head_hidden, bool) and 0 <= self.head_hidden <= 65_536
        check(ok, "ExitConfig.head_hidden", f"must be an integer in [0, 65536], got {self.head_hidden!r}")
        ok = isinstance(self.head_bins, int) and not isinstance(self.head_bins, bool) and 1 <= self.head_bins <= 64
        check(ok, "ExitConfig.head_bins", f"must be an integer in [1, 64], got {self.head_bins!r}")
        check(self.finetune is None or isinstance(self.finetune, TrainConfig), "ExitConfig.finetune",
              "must be a torchslim.core.train.TrainConfig or None")
        ok = isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= 2**63 - 1
        check(ok, "ExitConfig.seed", f"must be an integer in [0, 2**63 - 1], got {self.seed!r}")


def build(model: nn.Module, cfg: ExitConfig, task: Task) -> EarlyExitModel:
    """An untrained, never-exiting EarlyExitModel around a copy of model."""
    example = task.example_inputs(batch_size=2)
    if isinstance(example, Mapping) and is_bert_classifier(model):
        return build_bert(model, cfg, example)  # dict inputs, attention mask regrouped (hf_bert.py)
    check(isinstance(example, torch.Tensor), "ExitConfig", "early exits need tensor inputs (model(x)), or dict "
          "inputs to a Hugging Face BERT classifier (model.bert + model.dropout + model.classifier)")
    device = model_device(model)
    example = example.to(device)
    backbone = copy.deepcopy(model).eval()
    parts = split(backbone, cfg.layers.include, cfg.layers.exclude)
    shapes = feature_shapes(parts.segments, example)
    final = shapes[-1]
    check(len(final) == 2, "ExitConfig", f"the model's output has shape {tuple(final)}; early exits need (batch, classes) logits")
    seed_everything(cfg.seed)
    heads = []
    for kind, shape in zip(parts.kinds, shapes[:-1]):
        if kind == "tokens":
            width = shape[-1]
        elif len(shape) in (3, 4):
            width = shape[1] * min(cfg.head_bins, *shape[2:]) ** (len(shape) - 2)
        else:
            width = shape[1] if len(shape) > 1 else 1
        bins = min(cfg.head_bins, *shape[2:]) if len(shape) in (3, 4) else 1
        heads.append(ExitHead(kind, int(width), int(final[1]), cfg.head_hidden, bins))
    policy = POLICIES[cfg.policy]
    never = -NEVER if cfg.policy == "entropy" else NEVER
    ee = EarlyExitModel(parts.segments, heads, policy, [never] * len(heads), parts.cuts)
    return ee.to(device).train(model.training)


def _loss(task: Task, cfg: ExitConfig):
    base = task.loss

    def joint(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.dim() == 2:  # eval-mode output (not used for training)
            return base(out, y)
        return base(out[-1], y) + cfg.head_weight * sum(base(o, y) for o in out[:-1])

    def distill(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.dim() == 2:
            return base(out, y)
        teacher = out[-1].detach()
        soft = sum(kd_loss(o, teacher, cfg.temperature) for o in out[:-1])
        hard = sum(base(o, y) for o in out[:-1]) if cfg.alpha < 1 else 0.0
        return cfg.alpha * soft + (1 - cfg.alpha) * hard

    return joint if cfg.mode == "joint" else distill


def train_heads(ee: EarlyExitModel, cfg: ExitConfig, task: Task) -> dict[str, Any]:
    if cfg.finetune is None:
        return {}
    if cfg.mode == "distill":
        ee.freeze_backbone = True
        for p in ee.backbone_parameters():
            p.requires_grad_(False)
    try:
        result = fit(ee, dataclasses.replace(task, loss=_loss(task, cfg)), cfg.finetune, hooks=training_hooks(ee))
    finally:
        ee.freeze_backbone = False
        for p in ee.backbone_parameters():
            p.requires_grad_(True)
    return result.to_dict()


@torch.no_grad()
def head_logits(ee: EarlyExitModel, task: Task, split_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(E + 1, N, C) logits of every head on a split, and the targets."""
    outs, ys = [], []
    device = ee.thresholds.device
    with eval_mode(ee):
        for x, y in task.split(split_name):
            outs.append(ee.all_logits(ee.prepare(to_device(x, device))).float().cpu())
            ys.append(y.cpu())
    return torch.cat(outs, dim=1), torch.cat(ys)


def stage_costs(ee: EarlyExitModel, task: Task) -> dict[str, Any]:
    """MACs per sample of each segment and head; cum_cost[i] = cost of exiting at i (heads run
    on the way included); full = the backbone alone (what the original model costs)."""
    x = ee.prepare(to_device(task.example_inputs(batch_size=1), ee.thresholds.device))
    seg, head = [], []
    heads = ee.head_list()
    with torch.no_grad():
        h = x
        for i, s in enumerate(ee.segment_list()):
            seg.append(count_macs(s, h))
            h = s(h)
            if i < len(heads):
                head.append(count_macs(heads[i], h))
    cum, total = [], 0
    for i in range(len(seg)):
        total += seg[i] + (head[i] if i < len(head) else 0)
        cum.append(total)
    return {"segment_macs": seg, "head_macs": head, "cum_cost": cum, "full_macs": sum(seg)}


def set_threshold(ee: EarlyExitModel, threshold: float | list[float]) -> None:
    """One threshold for every exit, or one per exit."""
    if isinstance(threshold, (list, tuple)):
        ee.thresholds.copy_(torch.tensor([float(t) for t in threshold], dtype=ee.thresholds.dtype))
    else:
        ee.thresholds.fill_(float(threshold))


@register_stage(ExitConfig, copy_input=False)  # builds on a copy of the backbone
def early_exit(model: nn.Module, cfg: ExitConfig, task: Task) -> StageResult:
    """Exits on a copy of model, trained and calibrated on task; the input model is untouched."""
    if task.val is None:
        raise ConfigError(f"ExitConfig: task {task.name!r} has no val split; thresholds are calibrated on it")
    reference = task.evaluate(model, "val")  # the bound is against the model the user gave
    ee = build(model, cfg, task)
    fit_info = train_heads(ee, cfg, task)
    costs = stage_costs(ee, task)
    cum = torch.tensor(costs["cum_cost"], dtype=torch.float64) / costs["full_macs"]
    val_logits, val_y = head_logits(ee, task, "val")
    cal = calibrate(val_logits, val_y, cfg.policy, cum, cfg.accuracy_drop, cfg.latency_budget, reference,
                    per_exit=cfg.per_exit_thresholds)
    set_threshold(ee, cal["thresholds"])
    test_logits, test_y = head_logits(ee, task, "test")
    test = evaluate_threshold(test_logits, test_y, cfg.policy, cal["thresholds"], cum)
    info = {
        "exits_after": ee.cut_names, "policy": cfg.policy, "mode": cfg.mode, "threshold": cal["threshold"],
        "thresholds": cal["thresholds"],
        "val_accuracy": cal["val_accuracy"], "full_val_accuracy": cal["full_val_accuracy"],
        "reference_val_accuracy": reference, "budget_met": cal["budget_met"], "exit_rates": cal["exit_rates"],
        "expected_cost_frac": cal["mean_cost"], "test_accuracy": test["accuracy"],
        "full_test_accuracy": float((test_logits[-1].argmax(-1) == test_y).float().mean()),
        "test_exit_rates": test["exit_rates"], "test_cost_frac": test["mean_cost"],
        "head_accuracy_val": [float((lg.argmax(-1) == val_y).float().mean()) for lg in val_logits],
        "curve": {k: [r[k] for r in cal["curve"]] for k in ("threshold", "accuracy", "mean_cost")},
        "costs": costs, "cost_model": "MACs per sample (heads included), as a fraction of the backbone's",
        "fit": fit_info,
    }
    from .export import scriptable_save

    save, note = scriptable_save(ee)
    info["torchscript"] = note
    return StageResult(ee.train(model.training), info, save)

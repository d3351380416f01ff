"""Structured pruning with physical removal: Linear neurons and Conv output channels.

What is coupled comes from Torch-Pruning's dependency graph (``graph.py``); what is unimportant
from Torch-Pruning's group importance objects (one per criterion below); how much and when is
ours: a MAC (or channel) target reached by bisection, uniformly per layer or globally by
mean-normalised score, in ``steps`` rounds of prune -> fine-tune. The final classifier's outputs
are never pruned; layers that cannot be resized safely are skipped with a warning.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Any

import torch
from torch import nn

from ..core.bounds import check_bounds, count, fraction, seed_field
from ..core.config_base import config
from ..core.errors import check
from ..core.selection import Layers, layers_field
from ..core.stage import StageResult, register_stage, training_hooks
from ..core.task import Task, call_model
from ..core.train import TrainConfig, fit
from ..core.utils import eval_mode, model_device, removing, to_device
from . import graph
from .importance import backward_batches
from .masks import attach_masks, masks_of
from .masks import remove as remove_masks

CRITERIA = {
    "l1": lambda: graph.torch_pruning().importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: graph.torch_pruning().importance.GroupMagnitudeImportance(p=2),
    "bn_scale": lambda: graph.torch_pruning().importance.BNScaleImportance(),
    "taylor": lambda: graph.torch_pruning().importance.GroupTaylorImportance(),
    "random": lambda: graph.torch_pruning().importance.RandomImportance(),
}
ALLOCATIONS = ("uniform", "global")


@config(renamed={"ignore": "layers: {exclude: [...]}", "taylor_batches": "batches"})
class StructuredPruneConfig:
    """How to shrink a model structurally.

    macs_keep: fraction of the model's MACs to keep (0, 1]; or set it to None and give
        channel_keep: fraction of each prunable layer's output channels to keep (0, 1].
    criterion: group score of a channel: "l1" / "l2" (norm over all coupled weights), "bn_scale"
        (|gamma| of the coupled BatchNorms), "taylor" (|w * dL/dw| on ``batches`` train
        batches), "random" (a control).
    allocation: "uniform" (the same share of every layer) or "global" (one threshold on scores
        normalised by each group's mean; no layer loses more than max_layer_prune).
    steps: rounds of prune -> fine-tune (the target is approached linearly).
    layers: which modules' outputs may be pruned (a LayerSelection: include / exclude globs on
        ``model.named_modules()`` names; a module it does not select is left untouched, with
        everything inside it); the classifier's outputs are never pruned.
    round_to: keep channel counts multiples of this (SIMD-friendly widths), or None.
    finetune: TrainConfig run after every step (its epochs/max_steps is the per-step budget).
    """

    macs_keep: float | None = fraction(0.5, low_open=True, optional=True)
    channel_keep: float | None = fraction(None, low_open=True)
    criterion: str = "l2"
    allocation: str = "uniform"
    steps: int = count(1, 1, 1000)
    layers: Layers = layers_field()
    round_to: int | None = count(None, 1, 4096, optional=True)
    max_layer_prune: float = fraction(0.9, low_open=True, high_open=True)
    finetune: TrainConfig | None = None
    batches: int = count(4, 1, 100_000)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_bounds(self)
        f = "StructuredPruneConfig"
        check((self.macs_keep is None) != (self.channel_keep is None), f"{f}.macs_keep",
              "set exactly one of macs_keep and channel_keep (the other None)")
        for name in ("macs_keep", "channel_keep"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, (int, float)) and 0 < v <= 1), f"{f}.{name}",
                  f"must be a fraction in (0, 1], got {v!r}")
        check(self.criterion in CRITERIA, f"{f}.criterion",
              f"unknown criterion {self.criterion!r}; use one of {', '.join(CRITERIA)}")
        check(self.allocation in ALLOCATIONS, f"{f}.allocation",
              f"unknown allocation {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
        check(isinstance(self.steps, int) and self.steps >= 1, f"{f}.steps", f"must be an integer >= 1, got {self.steps!r}")
        check(self.round_to is None or (isinstance(self.round_to, int) and self.round_to >= 1),
              f"{f}.round_to", f"must be an integer >= 1 or None, got {self.round_to!r}")
        check(0 < self.max_layer_prune < 1, f"{f}.max_layer_prune", f"must be in (0, 1), got {self.max_layer_prune!r}")
        check(self.finetune is None or isinstance(self.finetune, TrainConfig), f"{f}.finetune",
              "must be a torchslim.TrainConfig or None")
        check(isinstance(self.batches, int) and self.batches >= 1, f"{f}.batches",
              f"must be an integer >= 1, got {self.batches!r}")


def unselected(model: nn.Module, cfg: StructuredPruneConfig) -> list[nn.Module]:
    """The outermost modules ``cfg.layers`` does not select (Torch-Pruning ignores what is inside)."""
    out, names = [], []
    for n, m in model.named_modules():
        if n and not cfg.layers.matches(n, m) and not any(n.startswith(p + ".") for p in names):
            out.append(m)
            names.append(n)
    return out


def count_macs(model: nn.Module, inputs: Any) -> int:
    """MACs of one forward (torchslim.measure's definition when present, else FLOPs / 2)."""
    try:
        from ..core.measure import count_macs as measure_macs
    except ImportError:
        measure_macs = None
    if measure_macs is not None:
        return int(measure_macs(model, inputs))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call_model(model, inputs)
    return int(counter.get_total_flops() // 2)


def layer_macs(model: nn.Module, inputs: Any) -> dict[str, int]:
    """Per Conv/Linear MACs of one forward (closed form from the output size)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(mod, _inp, out):
            per_out = mod.in_features if isinstance(mod, nn.Linear) else \
                mod.in_channels // mod.groups * math.prod(mod.kernel_size)
            macs[name] = macs.get(name, 0) + out.numel() * per_out
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, graph.ROOT_TYPES)]
    with removing(hooks), torch.no_grad():
        call_model(model, inputs)
    return macs


def channel_scores(model: nn.Module, groups: dict[str, Any], cfg: StructuredPruneConfig, task: Task) -> dict[str, torch.Tensor]:
    """A score per output channel of every group (higher = keep), mean-normalised per group."""
    torch.manual_seed(cfg.seed)
    if cfg.criterion == "taylor":
        backward_batches(model, task, cfg.batches, training=False)
    imp = CRITERIA[cfg.criterion]()
    scores = {}
    for root, group in groups.items():
        s = imp(group)
        if s is None:  # e.g. bn_scale on a group without BatchNorm: fall back to the L2 norm
            s = CRITERIA["l2"]()(group)
        s = s.detach().float().cpu()
        scores[root] = s / s.mean().clamp_min(1e-12)
    if cfg.criterion == "taylor":
        model.zero_grad(set_to_none=True)
    return scores


def _n_remove(n: int, share: float, cfg: StructuredPruneConfig) -> int:
    keep = max(1, n - round(n * share))
    if cfg.round_to and n >= cfg.round_to:
        keep = max(cfg.round_to, round(keep / cfg.round_to) * cfg.round_to)
    return max(0, min(n - keep, n - 1))


def make_plan(scores: dict[str, torch.Tensor], share: float | dict[str, float], cfg: StructuredPruneConfig) -> graph.Plan:
    """Channels to remove: the lowest-scored ``share`` of every group (uniform; a dict gives one
    share per group) or of all channels together (global, capped per group)."""
    plan: graph.Plan = {}
    if cfg.allocation == "global" and scores and not isinstance(share, dict):
        flat = torch.cat(list(scores.values()))
        k = int(len(flat) * share)
        thr = flat.sort().values[k - 1].item() if k > 0 else -math.inf
        for root, s in scores.items():
            local = min(int((s <= thr).sum()) / len(s), cfg.max_layer_prune)
            plan[root] = s.argsort()[: _n_remove(len(s), local, cfg)].tolist()
        return plan
    for root, s in scores.items():
        local = share[root] if isinstance(share, dict) else share
        plan[root] = s.argsort()[: _n_remove(len(s), local, cfg)].tolist()
    return plan


def layer_shrink(model: nn.Module, groups: dict[str, Any]) -> dict[str, list[tuple[str, str, float]]]:
    """root -> [(layer, "in"|"out", layer channels lost per root channel)] from the full groups
    (the factor covers index mappings such as a flatten: one conv channel = H*W inputs)."""
    names = graph.module_names(model)
    out: dict[str, list[tuple[str, str, float]]] = {}
    for root, group in groups.items():
        n = graph.group_size(group)
        for dep, idxs in group:
            mod = dep.target.module
            if isinstance(mod, graph.ROOT_TYPES) and mod in names:
                side = "out" if dep.handler.__name__.endswith("out_channels") else "in"
                out.setdefault(root, []).append((names[mod], side, len(idxs) / n))
    return out


def estimate_macs(base: dict[str, int], widths: dict[str, tuple[int, int]],
                  shrink: dict[str, list[tuple[str, str, float]]], plan: graph.Plan) -> float:
    """Conv/Linear MACs after plan: each layer's MACs scale with its kept in x out share
    (depthwise convs lose only outputs, which the in-side factor already accounts for)."""
    lost: dict[tuple[str, str], float] = {}
    for root, idxs in plan.items():
        for layer, side, per in shrink.get(root, []):
            lost[(layer, side)] = lost.get((layer, side), 0.0) + per * len(idxs)
    total = 0.0
    for layer, macs in base.items():
        c_in, c_out = widths[layer]
        keep_in = max(c_in - lost.get((layer, "in"), 0.0), 0) / c_in
        keep_out = max(c_out - lost.get((layer, "out"), 0.0), 0) / c_out
        total += macs * keep_in * keep_out
    return total


def plan_for_macs(model: nn.Module, groups: dict[str, Any], scores: dict[str, torch.Tensor],
                  target_share: float, cfg: StructuredPruneConfig, example: Any) -> graph.Plan:
    """Bisect the pruned share so that Conv/Linear MACs drop to ``target_share`` of the
    current model's (closed form per layer, so no re-tracing inside the search)."""
    base, widths, shrink = layer_macs(model, example), graph.layer_widths(model), layer_shrink(model, groups)
    target = target_share * sum(base.values())
    lo, hi = 0.0, cfg.max_layer_prune if cfg.allocation == "uniform" else 0.99
    best = make_plan(scores, hi, cfg)
    for _ in range(20):
        mid = (lo + hi) / 2
        plan = make_plan(scores, mid, cfg)
        if estimate_macs(base, widths, shrink, plan) <= target:
            hi, best = mid, plan
        else:
            lo = mid
    return best


def prune_structured(model: nn.Module, cfg: StructuredPruneConfig, task: Task) -> tuple[nn.Module, dict[str, Any]]:
    """Prune (and fine-tune) a copy of model; return it and the record of what changed."""
    from torch.nn.utils import parametrize

    shared = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    check(not shared, "StructuredPruneConfig",
          f"{(shared or [''])[0]!r} holds a parametrized (e.g. shared) weight, whose shape cannot change; "
          "run structured pruning before weight sharing in the recipe")
    example = task.example_inputs(batch_size=1)
    model = copy.deepcopy(model)  # the input is never modified; the copy comes back in its own mode
    # tracing, MAC counting and scoring run forward passes: in eval mode, so BatchNorm running
    # statistics are not updated by them (results must not depend on the mode the model came in)
    with eval_mode(model):
        names = dict(model.named_modules())
        unknown = [p for p in cfg.layers.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        check(not unknown, "StructuredPruneConfig.layers.exclude", f"no module matches {unknown[:1]} in the model")
        base_macs, base_widths = count_macs(model, example), graph.layer_widths(model)
        base_layer_macs = layer_macs(model, example)
        base_params = sum(p.numel() for p in model.parameters())
        skipped: dict[str, str] = {}
        history: list[dict[str, Any]] = []
        first: dict[str, int] = {}
        for step in range(1, cfg.steps + 1):
            example = to_device(example, model_device(model))
            head = graph.classifier_layer(model, example)
            ignored = [m for m in (head,) if m is not None] + unselected(model, cfg)
            dg = graph.build_graph(model, example)
            groups, skipped = graph.safe_groups(model, dg, ignored, warn=step == 1)
            check(bool(groups), "StructuredPruneConfig.layers",
                  "no prunable layer is left (all ignored, unsupported, or only the classifier)")
            scores = channel_scores(model, groups, cfg, task)
            if cfg.macs_keep is not None:
                target = base_macs * (1 - (1 - cfg.macs_keep) * step / cfg.steps)
                now = history[-1]["macs"] if history else base_macs
                plan = plan_for_macs(model, groups, scores, target / now, cfg, example)
            else:
                # widths shrink geometrically towards channel_keep of the original ones
                first = first or {r: len(s) for r, s in scores.items()}
                frac = cfg.channel_keep ** (step / cfg.steps)
                plan = make_plan(scores, {r: 1 - round(first.get(r, len(s)) * frac) / len(s) for r, s in scores.items()}, cfg)
            # pruning masks of an earlier stage are buffers torch_pruning does not slice: bake them
            # (the pruned weights are exact zeros), remove channels, re-derive them from the zeros
            masked = set(masks_of(model))
            remove_masks(model)
            graph.prune_plan(model, plan, example, dg)
            if masked:
                with torch.no_grad():
                    attach_masks(model, {n: p != 0 for n, p in model.named_parameters() if n in masked}, intersect=False)
            row: dict[str, Any] = {"step": step, "macs": count_macs(model, example),
                                   "removed": {k: v for k, v in plan.items() if v}}
            if cfg.finetune is not None and task.train is not None:
                row["finetune"] = fit(model, task, cfg.finetune, hooks=training_hooks(model)).to_dict()["history"]
                model.eval()
            history.append(row)
        after_widths, after_layer_macs = graph.layer_widths(model), layer_macs(model, example)
        layers = {n: {"in_before": base_widths[n][0], "in_after": after_widths[n][0],
                      "out_before": base_widths[n][1], "out_after": after_widths[n][1],
                      "macs_before": base_layer_macs.get(n, 0), "macs_after": after_layer_macs.get(n, 0)}
                  for n in base_widths if n in after_widths}
        macs = history[-1]["macs"]
    info = {"macs_before": base_macs, "macs_after": macs, "macs_ratio": macs / max(base_macs, 1),
            "params_before": base_params,
            "params_after": sum(p.numel() for p in model.parameters()),
            "layers": layers, "skipped": skipped, "steps": history}
    return model, info


@register_stage(StructuredPruneConfig, copy_input=False)  # prune_structured copies first
def apply(model: nn.Module, cfg: StructuredPruneConfig, task: Task) -> StageResult:
    """Stage entry point: a new, physically smaller model (the input model is not modified)."""
    pruned, info = prune_structured(model, cfg, task)
    return StageResult(pruned, info)

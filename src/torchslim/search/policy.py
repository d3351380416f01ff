"""A policy is data: it becomes an ordinary recipe that ``torchslim run`` reproduces.

Per-group keep ratios become one ``structured_prune`` stage per distinct ratio
(``channel_keep`` = the ratio, ``layers.exclude`` = the output layers of every other group, so each
stage touches exactly its own groups); per-layer low-rank shares one ``lowrank`` stage (a rank per
layer, computed at the widths the structured stages leave: ``SearchSpace.ranks_of``); per-layer
sparsities one ``prune`` stage (``per_layer``); one ``train`` stage fine-tunes; per-layer share
bits one ``share`` stage after it (k-means of the fine-tuned weights, no centroid fine-tune of
its own); keep-float choices one ``quantize`` stage (``layers.exclude``: the keep-float layers,
every shared layer and both factors of every factorized layer, ``SearchSpace.float_layers``).
The techniques never learn that a search wrote the recipe.

``evaluate`` applies those very stages the way the runner does (stage ``i`` seeded with
``seed + i + 1``, fine-tune through ``fit`` with the techniques' training hooks), so the metric
a trial reports is the metric ``torchslim run`` measures on the written recipe.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..app.recipe import load_recipe
from ..core.stage import apply_stage, training_hooks
from ..core.task import Task
from ..core.train import fit
from ..core.utils import seed_everything
from .space import Policy, SearchSpace


def to_stages(policy: Policy, space: SearchSpace, finetune: dict[str, Any] | None,
              criterion: str = "l2", quantize: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The recipe stages (plain mappings, as written in YAML) that carry out ``policy``."""
    stages: list[dict[str, Any]] = []
    by_keep: dict[int, list[str]] = {}
    for g in space.groups:
        w = space.width(g, policy.keep.get(g.root, 1.0))
        if w < g.channels:
            # group by the exact ratio that reproduces this width under channel_keep's rounding
            by_keep.setdefault(round(w / g.channels * 1e6), []).append(g.root)
    for ratio, roots in sorted(by_keep.items(), reverse=True):
        keep = ratio / 1e6
        others = sorted({m for g in space.groups if g.root not in roots for m in g.members})
        stages.append({"name": f"keep-{keep:.3f}", "structured_prune": {
            "macs_keep": None, "channel_keep": keep, "criterion": criterion, "layers": {"exclude": others}}})
    ranks = space.ranks_of(policy)
    if ranks:  # every listed layer factorized: no MAC-saving threshold, the rank already saves
        stages.append({"lowrank": {"rank": ranks, "layers": list(ranks), "min_mac_saving": 0.0, "min_saved_macs": 0}})
    sparse = {k: float(v) for k, v in policy.sparsity.items() if v > 0}
    if sparse:
        # PruneConfig scales per_layer by (sparsity now / sparsity) and gives unlisted selected
        # layers `sparsity`: so sparsity = the largest value, and only the listed layers selected
        stages.append({"prune": {"sparsity": max(sparse.values()), "per_layer": sparse,
                                 "layers": sorted(sparse), "scope": "layer"}})
    if finetune is not None:  # {} = a fine-tune with TrainConfig's defaults; None = none
        stages.append({"name": "finetune", "train": dict(finetune)})
    if policy.share:  # sharing clusters the trained weights, so it comes after the fine-tune
        stages.append({"share": {"bits": {k: int(v) for k, v in policy.share.items()}, "layers": list(policy.share)}})
    if policy.keep_float is not None:
        # ONNX Runtime's static int8 kernels: what the int8 latency table priced (int8_cost.py)
        q = dict(quantize or {"bits": 8, "mode": "static", "backend": space.int8_backend})
        q["layers"] = {"exclude": int8_exclude(policy, space)}
        q.setdefault("granularity", policy.granularity or "per_channel")
        stages.append({"quantize": q})
    return stages


def int8_exclude(policy: Policy, space: SearchSpace) -> list[str]:
    """The module names an int8 stage leaves float: ``space.float_layers`` with a factorized
    layer as its two factors (``name.0``, ``name.1``: the modules of its ``LowRankPair``)."""
    out: list[str] = []
    ranks = space.ranks_of(policy)
    for n in space.float_layers(policy) or ():
        out += [f"{n}.0", f"{n}.1"] if n in ranks else [n]
    return out


def to_recipe(policy: Policy, space: SearchSpace, base: dict[str, Any], finetune: dict[str, Any] | None,
              **kw: Any) -> dict[str, Any]:
    """A whole recipe: ``base`` (task, model with weights, seed, measure, export...) + stages."""
    recipe = {k: copy.deepcopy(v) for k, v in base.items() if k not in ("stages", "search", "train")}
    recipe["stages"] = to_stages(policy, space, finetune, **kw)
    return recipe


def evaluate(model: nn.Module, recipe: dict[str, Any], task: Task, splits: tuple[str, ...] = ("val", "test")
             ) -> tuple[nn.Module, dict[str, float]]:
    """Run the recipe's stages on a copy of ``model`` as the runner does; metric per split."""
    parsed = load_recipe(recipe)
    seed = parsed.spec.seed
    # train mode, as the runner hands over a freshly built model: the mode matters, because
    # tracing a model in train mode (structured pruning) updates its BatchNorm statistics
    model = copy.deepcopy(model).train()
    for i, stage in enumerate(parsed.stages):
        seed_everything(seed + i + 1)
        model = apply_stage(model, stage.config, task).model
        if stage.finetune is not None:
            fit(model, task, stage.finetune, hooks=training_hooks(model))
    return model, {s: float(task.evaluate(model, s)) for s in splits}

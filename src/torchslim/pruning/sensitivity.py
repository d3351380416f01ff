"""Sensitivity analysis: how much the metric drops when one layer alone is pruned, and a
per-layer sparsity allocation for a target global sparsity that spares sensitive layers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import check
from ..core.task import Task
from .importance import score_params
from .masks import masks_for_sparsity
from .unstructured import PruneConfig, select_layers


@torch.no_grad()
def _eval_pruned(model: nn.Module, task: Task, name: str, score: torch.Tensor, sparsity: float, split: str) -> float:
    p = dict(model.named_parameters())[name]
    saved = p.detach().clone()
    try:
        p.mul_(masks_for_sparsity({name: score}, sparsity, "layer")[name].to(p.device, p.dtype))
        return task.evaluate(model, split)
    finally:
        p.copy_(saved)


def sensitivity(model: nn.Module, task: Task, sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
                config: PruneConfig | None = None, split: str = "val") -> list[dict]:
    """One row per (layer, sparsity): {layer, numel, sparsity, metric, drop}; others stay dense.
    ``config`` picks the layers and criterion (default: PruneConfig()); the model is unchanged."""
    cfg = config or PruneConfig()
    check(all(0.0 <= s < 1.0 for s in sparsities) and len(sparsities) > 0, "sensitivity.sparsities",
          f"need a non-empty list of values in [0, 1), got {list(sparsities)}")
    names, _ = select_layers(model, cfg)
    base = task.evaluate(model, split)
    scores = score_params(model, names, cfg.criterion, task, batches=cfg.batches, seed=cfg.seed)
    params = dict(model.named_parameters())
    rows = []
    for name in names:
        for s in sparsities:
            metric = _eval_pruned(model, task, name, scores[name], s, split)
            rows.append({"layer": name, "numel": params[name].numel(), "sparsity": float(s),
                         "metric": metric, "dense_metric": base, "drop": base - metric})
    return rows


def _curves(table: list[dict]) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """Per layer: numel, sparsity grid, and the monotone (running-max) drop on that grid."""
    grid = np.linspace(0.0, 0.999, 1000)
    by: dict[str, list[dict]] = {}
    for row in table:
        by.setdefault(row["layer"], []).append(row)
    out = {}
    for name, rows in by.items():
        rows = sorted(rows, key=lambda r: r["sparsity"])
        xs = [0.0] + [r["sparsity"] for r in rows]
        ys = [0.0] + [max(r["drop"], 0.0) for r in rows]
        # beyond the largest tested sparsity the drop is unknown: treat it as prohibitive
        drop = np.where(grid <= xs[-1], np.interp(grid, xs, ys), np.inf)
        out[name] = (rows[0]["numel"], grid, np.maximum.accumulate(drop))
    return out


def allocate(table: list[dict], target: float) -> dict[str, float]:
    """Per-layer sparsities whose size-weighted mean is ``target``: every layer is pruned as far
    as it can go within one common tolerated drop, the smallest tolerance reaching the target."""
    check(0.0 <= target < 1.0, "allocate.target", f"must be in [0, 1), got {target!r}")
    curves = _curves(table)
    check(len(curves) > 0, "allocate.table", "is empty; run sensitivity() first")
    total = sum(n for n, _, _ in curves.values())

    def at(tol: float) -> dict[str, float]:
        return {k: float(g[d <= tol].max()) for k, (n, g, d) in curves.items()}

    def glob(alloc: dict[str, float]) -> float:
        return sum(alloc[k] * curves[k][0] for k in alloc) / total

    finite = [float(d[np.isfinite(d)].max()) for _, _, d in curves.values()]
    hi_alloc = at(max(finite))
    check(glob(hi_alloc) >= target, "allocate.target",
          f"{target} is above what the tested sparsities reach ({glob(hi_alloc):.3f}); test higher sparsities")
    lo, hi = 0.0, max(finite)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if glob(at(mid)) >= target else (mid, hi)
    alloc = at(hi)
    scale = target / glob(alloc) if glob(alloc) > 0 else 0.0
    return {k: v * scale for k, v in alloc.items()}

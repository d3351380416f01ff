"""N:M semi-structured sparsity: in every group of M consecutive weights along the input
dimension, keep the N most important (2:4 is what sparse tensor cores accelerate).

On CUDA with 2:4, Linear weights are converted with ``torch.sparse.to_sparse_semi_structured``
(real sparse kernels). Anywhere else the zeros are only zeros: the stage warns and records
``speedup_expected: False`` rather than let a sparsity number pass for a speedup.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..core.bounds import bounded, check_bounds, count, seed_field
from ..core.config_base import config
from ..core.errors import check
from ..core.selection import Layers, layers_field
from ..core.stage import StageResult, register_stage
from ..core.task import Task
from ..core.train import TrainConfig
from ..export.sparse import save_sparse
from .importance import CRITERIA, score_params
from .masks import attach_masks, layer_records, masks_of, sparsity_of
from .schedule import finetune
from .unstructured import RENAMED_LAYERS, PruneConfig, select_layers


@config(renamed={**RENAMED_LAYERS, "taylor_batches": "batches"}, stage="nm")
class NMConfig:
    """n, m: keep n of every m weights along the input dimension (0 < n <= m).
    criterion / layers / batches: as in PruneConfig. finetune: optional budget.
    accelerate: on CUDA, convert 2:4 Linear weights to semi-structured sparse tensors."""

    n: int = bounded(2, 1, 64, integer=True)
    m: int = bounded(4, 1, 64, integer=True)
    criterion: str = "magnitude"
    layers: Layers = layers_field()
    finetune: TrainConfig | None = None
    accelerate: bool = True
    batches: int = count(4, 1, 100_000)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_bounds(self)
        if isinstance(self.finetune, dict):
            self.finetune = TrainConfig(**self.finetune)
        check(isinstance(self.m, int) and self.m >= 1, "NMConfig.m", f"must be an integer >= 1, got {self.m!r}")
        check(isinstance(self.n, int) and 0 < self.n <= self.m, "NMConfig.n",
              f"need 0 < N <= M, got N={self.n!r}, M={self.m!r} (e.g. n=2, m=4)")
        check(self.criterion in CRITERIA, "NMConfig.criterion",
              f"unknown criterion {self.criterion!r}; use one of {', '.join(sorted(CRITERIA))}")


def _to_groups(t: torch.Tensor) -> torch.Tensor:
    """(out, in, *k) -> (out, *k, in): the input dimension last, so groups run along it."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n highest scores in each group of m along dim 1 (size % m == 0)."""
    g = _to_groups(scores)
    shape = g.shape
    groups = g.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    keep = keep.reshape(shape)
    return keep.movedim(-1, 1) if scores.dim() > 2 else keep


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m along the input dimension has at most n non-zeros."""
    g = _to_groups(weight).reshape(-1, m)
    return bool(((g != 0).sum(dim=1) <= n).all())


def _accelerate(model: nn.Module, names: list[str], cfg: NMConfig) -> tuple[list[str], str]:
    """Swap 2:4 Linear weights for semi-structured sparse tensors where the hardware allows."""
    device = next(model.parameters()).device
    if (cfg.n, cfg.m) != (2, 4) or device.type != "cuda":
        why = f"{cfg.n}:{cfg.m} pattern" if (cfg.n, cfg.m) != (2, 4) else f"device {device.type}"
        return [], f"no sparse kernel for {why}; weights are zero-masked dense tensors and no speedup is expected"
    from torch.sparse import to_sparse_semi_structured

    done, errors = [], []
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(module, nn.Linear):
            continue
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            done.append(name)
        except Exception as exc:  # noqa: BLE001 - shape/dtype limits of the kernels: keep dense
            errors.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return done, "; ".join(errors) or "semi-structured sparse kernels in use"


def prune_nm(model: nn.Module, cfg: NMConfig, task: Task) -> tuple[nn.Module, dict[str, Any]]:
    """Apply N:M masks in place (layers whose input size is not a multiple of M are skipped)."""
    sel = PruneConfig(sparsity=0.0, layers=cfg.layers)
    names, skipped = select_layers(model, sel)
    params = dict(model.named_parameters())
    bad = [n for n in names if params[n].shape[1] % cfg.m]
    skipped += [f"{n} (input size {params[n].shape[1]} not a multiple of {cfg.m})" for n in bad]
    names = [n for n in names if n not in bad]
    if skipped:
        warnings.warn(f"N:M pruning skipped layers it cannot handle: {', '.join(skipped)}", stacklevel=2)
    scores = score_params(model, names, cfg.criterion, task, batches=cfg.batches, seed=cfg.seed)
    attach_masks(model, {n: nm_mask(s, cfg.n, cfg.m) for n, s in scores.items()})
    result = finetune(model, task, cfg.finetune)
    info: dict[str, Any] = {"pattern": f"{cfg.n}:{cfg.m}", "skipped": skipped, "fit": [result.to_dict()] if result else [],
                            "sparsity": sparsity_of({k: v for k, v in masks_of(model).items() if k in names}),
                            "layers": layer_records(model, names)}
    done, note = _accelerate(model, names, cfg) if cfg.accelerate else ([], "acceleration off")
    info.update(accelerated=done, speedup_expected=bool(done), note=note)
    if not done:
        warnings.warn(f"N:M sparsity: {note}", stacklevel=2)
    return model, info


@register_stage(NMConfig)
def apply(model: nn.Module, config: NMConfig, task: Task) -> StageResult:
    model, info = prune_nm(model, config, task)
    return StageResult(model, info, save=save_sparse if not info["accelerated"] else None)

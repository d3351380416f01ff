"""Regrowth when capacity is short after a drift: pruned weights with the largest gradient on
the recent window come back, starting at zero (RigL's growth criterion, Evci et al. 2020).

Not ``torchslim.pruning.regrow.recover``: that one restores weights to their *pre-pruning*
values and accepts a chunk only if a validation split's loss falls; a stream has neither the
pre-pruning weights nor a validation split, and after a drift the old values are no better a
start than zero. The masks are updated through ``torchslim.pruning.attach_masks`` so every later
step (MaskKeeper) keeps the new, slightly denser mask exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core.task import call_model
from ..core.utils import eval_mode


def regrow_by_gradient(model: nn.Module, batches: list[tuple[Any, torch.Tensor]], loss_fn: Any, fraction: float) -> int:
    """Regrow ``fraction`` of the currently pruned entries (global ranking by |grad|); returns how many."""
    from ..pruning.masks import attach_masks, masks_of, param_of

    masks = {n: m for n, m in masks_of(model).items() if isinstance(param_of(model, n), nn.Parameter)}
    if not masks or not batches:
        return 0
    grads = _gradients(model, batches, loss_fn, masks)
    names = list(masks)
    # kept entries never chosen
    scores = [torch.where(masks[n].flatten().cpu(), torch.full_like(grads[n], -1.0), grads[n]) for n in names]
    flat = torch.cat(scores)
    pruned = int((flat >= 0).sum())
    k = int(fraction * pruned)
    if k == 0:
        return 0
    chosen = torch.topk(flat, k).indices
    new, start = {}, 0
    for n, s in zip(names, scores):
        m = masks[n].flatten().clone()
        local = chosen[(chosen >= start) & (chosen < start + len(s))] - start
        m[local.to(m.device)] = True
        new[n] = m.reshape(masks[n].shape)
        start += len(s)
    attach_masks(model, new, intersect=False)
    return k


def swap_by_gradient(model: nn.Module, batches: list[tuple[Any, torch.Tensor]], loss_fn: Any, fraction: float) -> int:
    """Drop-and-grow at constant sparsity (RigL's update, Evci et al. 2020), per pruned tensor:
    the ``fraction`` of its kept weights with the smallest magnitude are pruned and as many
    pruned entries with the largest |gradient| on ``batches`` come back, at zero. Every tensor
    keeps exactly its number of non-zeros, so the sparse file's bytes hold; only where the
    non-zeros are moves (after a drift, to the inputs the new data needs). Returns the swaps."""
    from ..pruning.masks import attach_masks, masks_of, param_of

    masks = {n: m for n, m in masks_of(model).items() if isinstance(param_of(model, n), nn.Parameter)}
    if not masks or not batches:
        return 0
    grads = _gradients(model, batches, loss_fn, masks)
    new, swapped = {}, 0
    for n, m in masks.items():
        flat = m.flatten().cpu()
        kept, pruned = int(flat.sum()), int((~flat).sum())
        k = min(int(fraction * kept), pruned)
        if k == 0:
            continue
        w = param_of(model, n).detach().abs().flatten().cpu()
        grow = torch.topk(torch.where(flat, torch.full_like(grads[n], -1.0), grads[n]), k).indices
        drop = torch.topk(torch.where(flat, -w, torch.full_like(w, -math.inf)), k).indices  # smallest kept |w|
        out = flat.clone()
        out[drop] = False
        out[grow] = True
        new[n] = out.reshape(m.shape).to(m.device)
        swapped += k
    if new:
        attach_masks(model, new, intersect=False)
    return swapped


def _gradients(model: nn.Module, batches: list[tuple[Any, torch.Tensor]], loss_fn: Any,
               masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from ..pruning.masks import param_of

    with eval_mode(model):
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            loss_fn(call_model(model, x), y).backward()
        out = {}
        for n, m in masks.items():
            g = param_of(model, n).grad
            out[n] = g.detach().abs().flatten().cpu() if g is not None else torch.zeros(m.numel())
        model.zero_grad(set_to_none=True)
    return out

"""Pruning masks: which weights are kept, stored on the model, re-applied during training.

We keep our own masks instead of ``torch.nn.utils.prune``'s reparametrization because that one
renames ``weight`` to ``weight_orig`` plus a persistent ``weight_mask`` and a forward pre-hook:
the state_dict no longer loads into a fresh model, export/tracing sees the hook, and every
later stage would need to know about it. Here the weight tensor itself holds the zeros (so the
model is an ordinary model at all times) and the mask rides along as a *non-persistent* buffer
``<param>_slim_mask`` (moves with ``.to(device)``, survives deepcopy, never enters state_dict).
``MaskKeeper`` re-applies masks after each optimizer step so zeros stay zero through ``fit``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

SUFFIX = "_slim_mask"
Masks = dict[str, torch.Tensor]  # qualified parameter name ("net.1.weight") -> bool mask


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def param_of(model: nn.Module, name: str) -> torch.Tensor:
    module, attr = _split(name)
    return getattr(model.get_submodule(module), attr)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (weights and masks may live on any device)."""
    for name, mask in masks.items():
        p = param_of(model, name)
        p.mul_(mask.to(device=p.device, dtype=p.dtype))


def attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], intersect: bool = True) -> None:
    """Zero pruned weights and store each mask on its module as a non-persistent buffer.

    With intersect, a mask already on the model is combined with the new one (pruning is
    monotone); without, the new mask replaces it (regrowth)."""
    for name, mask in masks.items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        p = getattr(module, attr)
        mask = mask.to(device=p.device, dtype=torch.bool)
        old = getattr(module, attr + SUFFIX, None)
        if intersect and old is not None:
            mask = mask & old
        module.register_buffer(attr + SUFFIX, mask, persistent=False)
    apply_masks(model, masks_of(model))


def masks_of(model: nn.Module) -> Masks:
    """All masks stored on model, keyed by qualified parameter name."""
    out: Masks = {}
    for module_name, module in model.named_modules():
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf_name.endswith(SUFFIX):
                attr = buf_name[: -len(SUFFIX)]
                out[f"{module_name}.{attr}" if module_name else attr] = buf
    return out


@torch.no_grad()
def remove(model: nn.Module) -> nn.Module:
    """Bake masks into the weights and drop them; the model becomes a plain dense model
    (with zeros) that no longer keeps its sparsity during training."""
    for name, mask in masks_of(model).items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        getattr(module, attr).mul_(mask.to(getattr(module, attr).dtype))
        delattr(module, attr + SUFFIX)
    return model


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masks (0.0 for no masks)."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def layer_records(model: nn.Module, names: Iterable[str]) -> list[dict]:
    """Per-parameter record of what pruning left: layer, shape, kept, sparsity (from the weights)."""
    rows = []
    for name in names:
        p = param_of(model, name)
        kept = int(torch.count_nonzero(p))
        rows.append({"layer": name, "shape": list(p.shape), "kept": kept,
                     "sparsity": 1.0 - kept / p.numel() if p.numel() else 0.0})
    return rows


class MaskKeeper:
    """fit() hook: re-apply masks after every optimizer step so pruned weights stay zero.

    Re-zeroing after the step (rather than masking gradients) also holds with Adam momentum
    and weight decay, which would otherwise move pruned weights off zero.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        self.masks = dict(masks) if masks is not None else None

    def after_step(self, model: nn.Module, step: int) -> None:
        apply_masks(model, self.masks if self.masks is not None else masks_of(model))


def masks_for_sparsity(
    scores: Mapping[str, torch.Tensor], sparsity: float | Mapping[str, float], scope: str = "global",
    current: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Keep the highest-scoring weights so that exactly round(sparsity * n) entries are pruned
    (over all tensors for scope "global", per tensor for "layer" or a per-layer mapping).
    Entries already pruned in ``current`` are pruned first, so sparsity only grows."""
    shapes = {n: s.shape for n, s in scores.items()}
    scores = {n: s.detach().float().flatten() for n, s in scores.items()}
    if current:
        scores = {n: torch.where(current[n].flatten().to(s.device), s, torch.full_like(s, -float("inf")))
                  if n in current else s for n, s in scores.items()}
    if scope == "global" and not isinstance(sparsity, Mapping):
        names = list(scores)
        flat = torch.cat([scores[n].cpu() for n in names])
        keep = _keep_top(flat, sparsity)
        out, start = {}, 0
        for n in names:
            k = scores[n].numel()
            out[n] = keep[start:start + k]
            start += k
    else:
        out = {n: _keep_top(s.cpu(), sparsity[n] if isinstance(sparsity, Mapping) else sparsity)
               for n, s in scores.items()}
    return {n: m.reshape(shapes[n]) for n, m in out.items()}


def _keep_top(flat: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_prune = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune > 0:
        # stable sort: ties (e.g. many zeros) are broken by position, so the count is exact
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    return keep


"""Importance criteria: higher score = more important = kept.

One registry ``CRITERIA`` maps a name to ``score(weight, grad=None, generator=None) -> Tensor``
(same shape as weight). Group norms score structured units (a neuron's / channel's row of
weights, a BatchNorm's scale) and return one score per unit, for the structured pruner.
Whole layers are scored in ``layers.layer_importance`` (the layer-drop stage).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..core.task import Task, call_model
from ..core.utils import eval_mode, model_device, to_device

Score = Callable[..., torch.Tensor]


def magnitude_l1(weight: torch.Tensor, grad: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    return weight.detach().abs()


def magnitude_l2(weight: torch.Tensor, grad: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    return weight.detach().pow(2)


def taylor(weight: torch.Tensor, grad: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """First-order Taylor estimate of the loss change when a weight is zeroed: |w * dL/dw|
    (Molchanov et al. 2017); grad is accumulated over a few batches by ``accumulate_grads``."""
    if grad is None:
        raise ValueError("taylor criterion needs gradients; call accumulate_grads first")
    return (weight.detach() * grad.detach()).abs()


def random(weight: torch.Tensor, grad: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """Control: uniformly random scores (generator makes it reproducible)."""
    return torch.rand(weight.shape, generator=generator).to(weight.device)


CRITERIA: dict[str, Score] = {
    "magnitude": magnitude_l1,
    "l1": magnitude_l1,
    "l2": magnitude_l2,
    "taylor": taylor,
    "random": random,
}
NEEDS_GRAD = {"taylor"}


def register_criterion(name: str, needs_grad: bool = False) -> Callable[[Score], Score]:
    def deco(fn: Score) -> Score:
        CRITERIA[name] = fn
        if needs_grad:
            NEEDS_GRAD.add(name)
        return fn

    return deco


def accumulate_grads(model: nn.Module, task: Task, names: Iterable[str], batches: int = 4) -> dict[str, torch.Tensor]:
    """Sum of dL/dw over ``batches`` training batches for the named parameters (model unchanged)."""
    params = dict(model.named_parameters())
    names = list(names)
    grads = {n: torch.zeros_like(params[n]) for n in names}
    try:
        backward_batches(model, task, batches, training=True)
        for n in names:
            if params[n].grad is not None:
                grads[n] += params[n].grad.detach()
    finally:
        model.zero_grad(set_to_none=True)
    return grads


def backward_batches(model: nn.Module, task: Task, batches: int, training: bool = True) -> None:
    """Leave in each parameter's ``.grad`` the sum of dL/dw over ``batches`` training batches
    (the one gradient accumulator: Taylor scores here and Torch-Pruning's TaylorImportance in
    structured pruning read it), with the model in train (or eval) mode meanwhile."""
    device = model_device(model)
    model.zero_grad(set_to_none=True)
    with eval_mode(model, training), torch.enable_grad():
        for i, (inputs, targets) in enumerate(task.split("train")):
            if i >= batches:
                break
            task.loss(call_model(model, to_device(inputs, device)), to_device(targets, device)).backward()


def score_params(
    model: nn.Module, names: Iterable[str], criterion: str, task: Task | None = None,
    grads: Mapping[str, torch.Tensor] | None = None, batches: int = 4, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Scores for each named parameter; gradients are accumulated on task when needed."""
    names = list(names)
    params = dict(model.named_parameters())
    if criterion in NEEDS_GRAD and grads is None:
        if task is None:
            raise ValueError(f"criterion {criterion!r} needs a task to compute gradients")
        grads = accumulate_grads(model, task, names, batches)
    gen = torch.Generator().manual_seed(seed)
    fn = CRITERIA[criterion]
    return {n: fn(params[n], grads.get(n) if grads else None, gen) for n in names}


# ------------------------------------------------------------------ structured units
def group_norm(weight: torch.Tensor, p: int = 2, dim: int = 0) -> torch.Tensor:
    """L1 (p=1) or L2 (p=2) norm of each slice along ``dim`` (dim=0: output neurons/channels of
    a Linear/Conv weight; dim=1: input features/channels)."""
    w = weight.detach().transpose(0, dim).flatten(1)
    return w.norm(p=p, dim=1)


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """|gamma| of a BatchNorm per channel (Liu et al. 2017, network slimming)."""
    return bn.weight.detach().abs()


GROUP_CRITERIA: dict[str, Callable[..., torch.Tensor]] = {
    "l1": lambda w, dim=0: group_norm(w, 1, dim),
    "l2": lambda w, dim=0: group_norm(w, 2, dim),
}



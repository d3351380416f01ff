"""Forgetting control: a bounded replay buffer (reservoir sampling) and EWC.

Both are written here rather than taken from Avalanche: Avalanche's strategies own the whole
training loop (its own ``BaseStrategy.train`` over "experiences"), which would bypass the
hooks that keep masks and codebooks exact; what we need is two small pieces that plug into our
own per-batch step. Their whole state is tensors, so checkpoints hold it without pickling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.task import call_model
from ..core.utils import eval_mode


class ReplayBuffer:
    """Reservoir sample (Vitter's algorithm R) of at most ``capacity`` past samples: every sample
    seen so far is in the buffer with the same probability capacity / seen."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.size = 0
        self.seen = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError("replay needs tensor inputs (dict inputs are not buffered)")
        x, y = x.detach().cpu(), y.detach().cpu()
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.y = torch.zeros((self.capacity, *y.shape[1:]), dtype=y.dtype)
        for i in range(len(x)):
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.gen))
            self.seen += 1
            if slot < self.capacity:
                self.x[slot], self.y[slot] = x[i], y[i]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.size == 0 or n == 0:
            return None
        idx = torch.randint(0, self.size, (min(n, self.size),), generator=self.gen)
        return self.x[idx], self.y[idx]

    def state(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "size": self.size, "seen": self.seen, "rng": self.gen.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.x, self.y, self.size, self.seen = state["x"], state["y"], int(state["size"]), int(state["seen"])
        self.gen.set_state(state["rng"])


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017): after a consolidation, each
    trainable tensor is pulled towards its value then, weighted by the diagonal empirical Fisher
    (mean squared per-batch gradient). Consolidations add up (online EWC with decay 1).
    Used as a ``fit``-style hook through ``extra_loss``."""

    def __init__(self, strength: float):
        self.strength = strength
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def consolidate(self, model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], loss_fn: Any) -> None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        with eval_mode(model):
            try:
                for x, y in batches:
                    model.zero_grad(set_to_none=True)
                    loss_fn(call_model(model, x), y).backward()
                    for n, p in params.items():
                        if p.grad is not None:
                            fisher[n] += p.grad.detach() ** 2
                    count += 1
            finally:
                model.zero_grad(set_to_none=True)
        if count == 0:
            return
        for n, p in params.items():
            f = fisher[n] / count
            self.fisher[n] = self.fisher[n] + f if n in self.fisher else f
            self.anchor[n] = p.detach().clone()

    def extra_loss(self, model: nn.Module, inputs: Any = None, outputs: Any = None, targets: Any = None) -> torch.Tensor | float:
        if not self.fisher or self.strength == 0:
            return 0.0
        total: torch.Tensor | float = 0.0
        for n, p in model.named_parameters():
            if n in self.fisher:
                total = total + (self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
        return 0.5 * self.strength * total

    def state(self) -> dict[str, Any]:
        return {"fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])

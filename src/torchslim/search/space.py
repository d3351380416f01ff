"""The search space: per-layer choices of the techniques that exist, with the graph's constraints.

A *group* is a set of Conv/Linear layers whose output channels Torch-Pruning's dependency graph
couples (a conv, the BatchNorm after it, both sides of every residual add): they have one keep
ratio, so a policy can never ask for a shape the model cannot have. Per layer, a policy may also
choose an unstructured sparsity (``PruneConfig.per_layer``) and whether the layer stays float
when an int8 stage follows (``QuantConfig.layers.exclude``). A ``Policy`` is plain data (``policy.py``
turns it into a recipe); the space only knows which choices are legal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.errors import check
from ..core.task import Task
from ..pruning import graph
from ..pruning.structured import layer_shrink


@dataclass(frozen=True)
class Group:
    """Coupled output channels: ``root`` names the group (StructuredPruneConfig's plan key),
    ``members`` every Conv/Linear whose outputs shrink with it, ``inputs`` those whose inputs do."""

    root: str
    members: tuple[str, ...]
    inputs: tuple[str, ...]
    channels: int


GRANULARITIES = ("per_channel", "per_tensor")  # int8 weight scales the ORT kernels run


@dataclass
class Policy:
    """One point of the space. keep: group root -> kept share of its channels (1 = untouched);
    sparsity: layer -> unstructured sparsity of its weight; keep_float: layers left float by an
    int8 stage (None: no int8 stage at all), i.e. each layer's bit width, 8 or 32; granularity:
    the int8 stage's weight scales (GRANULARITIES; None without an int8 stage)."""

    keep: dict[str, float] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)
    keep_float: tuple[str, ...] | None = None
    granularity: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"keep": {k: round(v, 6) for k, v in self.keep.items()},
               "sparsity": {k: round(v, 6) for k, v in self.sparsity.items()},
               "keep_float": None if self.keep_float is None else list(self.keep_float)}
        if self.granularity is not None:  # only int8 policies carry it (older keys stay the same)
            out["granularity"] = self.granularity
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        kf = data.get("keep_float")
        return cls(dict(data.get("keep", {})), dict(data.get("sparsity", {})), None if kf is None else tuple(kf),
                   data.get("granularity"))

    def key(self) -> str:
        import json

        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class SearchSpace:
    """Legal choices for one model. keep_min: the smallest keep ratio of a group; sparsities:
    the unstructured sparsities a layer may take (empty: that dimension is off); int8: whether
    the keep-float choice per quantizable layer is searched."""

    groups: list[Group]
    layers: list[str]                      # every Conv/Linear weight layer, forward order
    classifier: str | None
    keep_min: float = 0.25
    sparsities: tuple[float, ...] = ()
    int8: bool = False
    step: int | None = 8
    int8_backend: str = "onnxruntime"  # the quantize stage's backend ("simulate": accuracy only)

    def __post_init__(self) -> None:
        check(self.step is None or (isinstance(self.step, int) and 1 <= self.step <= 1024), "SearchSpace.step",
              f"must be an integer in [1, 1024] or None, got {self.step!r}")
        check(0.0 < self.keep_min <= 1.0, "SearchSpace.keep_min", f"must be in (0, 1], got {self.keep_min!r}")
        check(all(0.0 <= s < 1.0 for s in self.sparsities), "SearchSpace.sparsities",
              f"each must be in [0, 1), got {list(self.sparsities)}")
        check(len(self.sparsities) <= 16, "SearchSpace.sparsities", "give at most 16 values")
        check(self.int8_backend in ("onnxruntime", "simulate"), "SearchSpace.int8_backend",
              f"must be 'onnxruntime' (real int8 kernels, priced) or 'simulate', got {self.int8_backend!r}")

    # -- choices ---------------------------------------------------------------------------
    @property
    def roots(self) -> list[str]:
        return [g.root for g in self.groups]

    def width(self, group: Group, keep: float) -> int:
        """Channels kept: a multiple of ``step`` (SIMD-friendly widths, which the latency table
        measures exactly) for groups wider than one step, else rounded to a channel."""
        n = group.channels
        if self.step and n > self.step:
            lo = max(self.step, -(-math.ceil(n * self.keep_min - 1e-9) // self.step) * self.step)
            return int(min(n, max(lo, round(n * keep / self.step) * self.step)))
        return max(1, min(n, round(n * keep)))

    def widths(self, group: Group) -> list[int]:
        """Every width the group may take."""
        if self.step and group.channels > self.step:
            lo = self.width(group, self.keep_min)
            return sorted(set(range(lo, group.channels + 1, self.step)) | {group.channels})
        return sorted({self.width(group, k / 100) for k in range(1, 101) if k / 100 >= self.keep_min} | {group.channels})

    def clip(self, policy: Policy) -> Policy:
        """The nearest legal policy: keeps within [keep_min, 1], sparsities on the grid."""
        keep = {g.root: min(1.0, max(self.keep_min, float(policy.keep.get(g.root, 1.0)))) for g in self.groups}
        sp = {}
        if self.sparsities:
            for layer, s in policy.sparsity.items():
                if layer in self.layers:
                    near = min(self.sparsities, key=lambda v: abs(v - s))
                    if near > 0:
                        sp[layer] = near
        kf, gran = None, None
        if self.int8 and policy.keep_float is not None:
            kf = tuple(n for n in self.layers if n in set(policy.keep_float))
            gran = policy.granularity if policy.granularity in GRANULARITIES else GRANULARITIES[0]
        return Policy(keep, sp, kf, gran)

    def canonical(self, policy: Policy) -> Policy:
        """The same policy with each keep written as the share it realizes (width / channels),
        so that a written (rounded) policy always maps back to the very same widths."""
        p = self.clip(policy)
        keep = {g.root: self.width(g, p.keep[g.root]) / g.channels for g in self.groups}
        return Policy(keep, p.sparsity, p.keep_float, p.granularity)

    def uniform(self, keep: float) -> Policy:
        return self.clip(Policy({r: keep for r in self.roots}, {}, () if self.int8 else None))

    def describe(self) -> dict[str, Any]:
        return {"groups": [{"root": g.root, "members": list(g.members), "channels": g.channels} for g in self.groups],
                "layers": self.layers, "classifier": self.classifier, "keep_min": self.keep_min,
                "sparsities": list(self.sparsities), "int8": self.int8, "step": self.step,
                "int8_backend": self.int8_backend}


def build_space(model: nn.Module, task: Task, keep_min: float = 0.25, sparsities: tuple[float, ...] = (),
                int8: bool = False, ignore: tuple[str, ...] = (), step: int | None = 8,
                int8_backend: str = "onnxruntime") -> SearchSpace:
    """The space of ``model``: one group per set of coupled channels (from the dependency
    graph; the classifier's outputs and ``ignore``d layers are never pruned)."""
    example = task.example_inputs(batch_size=1)
    head = graph.classifier_layer(model, example)
    dg = graph.build_graph(model, example)
    ignored = [m for m in (head,) if m is not None] + [model.get_submodule(n) for n in ignore]
    found, _ = graph.safe_groups(model, dg, ignored, warn=False)
    shrink = layer_shrink(model, found)
    groups = []
    for root, group in found.items():
        outs = tuple(dict.fromkeys(n for n, side, _ in shrink.get(root, []) if side == "out"))
        ins = tuple(dict.fromkeys(n for n, side, _ in shrink.get(root, []) if side == "in"))
        groups.append(Group(root, outs or (root,), ins, graph.group_size(group)))
    order = {n: i for i, n in enumerate(_forward_order(model, example))}
    groups.sort(key=lambda g: min(order.get(m, math.inf) for m in g.members))
    names = graph.module_names(model)
    layers = sorted((n for m, n in names.items() if isinstance(m, graph.ROOT_TYPES)), key=lambda n: order.get(n, math.inf))
    return SearchSpace(groups, layers, names.get(head) if head is not None else None, keep_min, tuple(sparsities), int8, step,
                       int8_backend)


def _forward_order(model: nn.Module, example: Any) -> list[str]:
    import torch

    from ..core.task import call_model
    from ..core.utils import removing

    names = graph.module_names(model)
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
             for m in model.modules() if isinstance(m, graph.ROOT_TYPES)]
    with removing(hooks), torch.no_grad():
        call_model(model, example)
    return list(dict.fromkeys(order))

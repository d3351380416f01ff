"""The search space: per-layer choices of the techniques that exist, with the graph's constraints.

A *group* is a set of Conv/Linear layers whose output channels Torch-Pruning's dependency graph
couples (a conv, the BatchNorm after it, both sides of every residual add): they have one keep
ratio, so a policy can never ask for a shape the model cannot have. Per layer, a policy may also
choose an unstructured sparsity (``PruneConfig.per_layer``) and whether the layer stays float
when an int8 stage follows (``QuantConfig.layers.exclude``), a low-rank factorization
(``LowRankConfig.rank``: the share of its params/MACs a factorized layer keeps) and a weight
sharing index width (``ShareConfig.bits``). A ``Policy`` is plain data (``policy.py`` turns it
into a recipe); the space only knows which choices are legal.

Constraints between the per-layer choices (``SearchSpace.clip`` enforces them):

* a factorized layer takes no unstructured sparsity and is not shared: its module is replaced
  by a pair of thin layers (``lowrank.LowRankPair``), so neither stage finds a weight of that
  name; rank wins: ``clip`` drops the layer's sparsity and share choice;
* a shared layer and a factorized one stay float in an int8 stage (``float_layers``: they are
  added to ``keep_float``'s effect when the stages are written; ``keep_float`` itself is kept as
  chosen). A shared weight is a k-means codebook decoded to float; a factorized layer's two
  factors are never in the int8 latency table, so both of them stay float (never one of two);
* only layers ``lowrank`` factorizes (Linear, Conv with groups == 1, not read directly by a
  parent: ``lowrank.factorizable_names``), never the classifier, and only where the widths the
  structured stages leave allow a rank below ``min(c_in*k, c_out)``.
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
    the int8 stage's weight scales (GRANULARITIES; None without an int8 stage); rank: layer ->
    share of its params/MACs kept by a low-rank factorization (absent: not factorized); share:
    layer -> weight-sharing index bits (absent: not shared). See the module doc's constraints."""

    keep: dict[str, float] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)
    keep_float: tuple[str, ...] | None = None
    granularity: str | None = None
    rank: dict[str, float] = field(default_factory=dict)
    share: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"keep": {k: round(v, 6) for k, v in self.keep.items()},
               "sparsity": {k: round(v, 6) for k, v in self.sparsity.items()},
               "keep_float": None if self.keep_float is None else list(self.keep_float)}
        if self.granularity is not None:  # only int8 policies carry it (older keys stay the same)
            out["granularity"] = self.granularity
        if self.rank:  # written only when used, as granularity: older policies keep their keys
            out["rank"] = {k: round(v, 6) for k, v in self.rank.items()}
        if self.share:
            out["share"] = {k: int(v) for k, v in self.share.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        kf = data.get("keep_float")
        return cls(dict(data.get("keep", {})), dict(data.get("sparsity", {})), None if kf is None else tuple(kf),
                   data.get("granularity"), dict(data.get("rank", {})), dict(data.get("share", {})))

    def key(self) -> str:
        import json

        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class SearchSpace:
    """Legal choices for one model. keep_min: the smallest keep ratio of a group; sparsities:
    the unstructured sparsities a layer may take (empty: that dimension is off); int8: whether
    the keep-float choice per quantizable layer is searched; ranks: the params/MACs shares a
    factorized layer may keep, each in (0, 1) (empty: off); share_bits: the weight-sharing index
    widths a layer may take, each an integer in [1, 8] (empty: off); shapes: factorizable layer
    -> (c_in, c_out, k) of the unpruned model, k the kernel's positions (1 for a Linear)."""

    groups: list[Group]
    layers: list[str]                      # every Conv/Linear weight layer, forward order
    classifier: str | None
    keep_min: float = 0.25
    sparsities: tuple[float, ...] = ()
    int8: bool = False
    step: int | None = 8
    int8_backend: str = "onnxruntime"  # the quantize stage's backend ("simulate": accuracy only)
    ranks: tuple[float, ...] = ()
    share_bits: tuple[int, ...] = ()
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.step is None or (isinstance(self.step, int) and 1 <= self.step <= 1024), "SearchSpace.step",
              f"must be an integer in [1, 1024] or None, got {self.step!r}")
        check(0.0 < self.keep_min <= 1.0, "SearchSpace.keep_min", f"must be in (0, 1], got {self.keep_min!r}")
        check(all(0.0 <= s < 1.0 for s in self.sparsities), "SearchSpace.sparsities",
              f"each must be in [0, 1), got {list(self.sparsities)}")
        check(len(self.sparsities) <= 16, "SearchSpace.sparsities", "give at most 16 values")
        check(self.int8_backend in ("onnxruntime", "simulate"), "SearchSpace.int8_backend",
              f"must be 'onnxruntime' (real int8 kernels, priced) or 'simulate', got {self.int8_backend!r}")
        check(len(self.ranks) <= 16 and all(_real(r) and 0.0 < r < 1.0 for r in self.ranks), "SearchSpace.ranks",
              f"give at most 16 shares, each in (0, 1) (e.g. [0.25, 0.5]), got {list(self.ranks)}")
        check(len(self.share_bits) <= 16 and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8
                                                 for b in self.share_bits), "SearchSpace.share_bits",
              f"give at most 16 index widths, each an integer in [1, 8], got {list(self.share_bits)}")
        # ORT's int8 stage exports a shared layer it keeps float as a plain fp32 weight (its graph has
        # no codebook op; defake materializes it), so the stored bits this space's size cost counts
        # for a shared layer are not what that file holds (and the policy's bytes would be wrong)
        check(not (self.share_bits and self.int8 and self.int8_backend == "onnxruntime"), "SearchSpace.share_bits",
              "ONNX Runtime's int8 graph stores a shared layer it keeps float as plain fp32 (no codebook), so sharing "
              "buys no bytes there; use int8_backend: simulate, or search share_bits without int8")

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

    def wire(self) -> dict[str, tuple[str | None, str | None]]:
        """layer -> (group root its inputs follow, group root its outputs follow)."""
        out: dict[str, list[str | None]] = {n: [None, None] for n in self.layers}
        for g in self.groups:
            for m in g.members:
                out.setdefault(m, [None, None])[1] = g.root
            for m in g.inputs:
                out.setdefault(m, [None, None])[0] = g.root
        return {k: (v[0], v[1]) for k, v in out.items()}

    def factor_widths(self, keep: dict[str, float]) -> dict[str, tuple[int, int, int]]:
        """(c_in, c_out, k) of every factorizable layer after the structured stages of ``keep``
        (the widths ``CostModel.widths`` gives, without a cost model)."""
        by_root = {g.root: self.width(g, keep.get(g.root, 1.0)) for g in self.groups}
        wire = self.wire()
        out = {}
        for layer, (c_in, c_out, k) in self.shapes.items():
            gi, go = wire.get(layer, (None, None))
            out[layer] = (by_root[gi] if gi else c_in, by_root[go] if go else c_out, k)
        return out

    def ranks_of(self, policy: Policy) -> dict[str, int]:
        """layer -> the rank ``policy.rank`` gives it at its widths after the structured stages
        (``factor_rank``); layers it cannot factorize there are left out."""
        widths = self.factor_widths(policy.keep)
        out = {}
        for layer, share in policy.rank.items():
            if layer in widths:
                c_in, c_out, k = widths[layer]
                r = factor_rank(share, c_in * k, c_out)
                if r is not None:
                    out[layer] = r
        return out

    def float_layers(self, policy: Policy) -> tuple[str, ...] | None:
        """The layers an int8 stage leaves float: ``keep_float`` plus every shared and every
        factorized layer (module doc); None without an int8 stage."""
        if policy.keep_float is None:
            return None
        extra = set(policy.keep_float) | set(policy.share) | set(self.ranks_of(policy))
        return tuple(n for n in self.layers if n in extra)

    def clip(self, policy: Policy) -> Policy:
        """The nearest legal policy: keeps within [keep_min, 1], sparsities, ranks and share bits
        on their grids (a rank share of 1 or more and 0 share bits mean none), and the module
        doc's constraints: a factorized layer is neither sparse nor shared (rank wins)."""
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
        rank: dict[str, float] = {}
        if self.ranks:
            for layer, r in policy.rank.items():
                near = min((*self.ranks, 1.0), key=lambda v: abs(v - r))
                if layer in self.shapes and layer != self.classifier and near < 1.0:
                    rank[layer] = near
            rank = {n: rank[n] for n in self.ranks_of(Policy(keep, rank=rank))}  # widths that allow a rank
        share: dict[str, int] = {}
        if self.share_bits:
            for layer, b in policy.share.items():
                if layer in self.layers and layer not in rank and b >= 1:
                    share[layer] = min(self.share_bits, key=lambda v: abs(v - b))
        sp = {n: v for n, v in sp.items() if n not in rank}
        order = {n: i for i, n in enumerate(self.layers)}
        return Policy(keep, sp, kf, gran, dict(sorted(rank.items(), key=lambda kv: order[kv[0]])),
                      dict(sorted(share.items(), key=lambda kv: order[kv[0]])))

    def canonical(self, policy: Policy) -> Policy:
        """The same policy with each keep written as the share it realizes (width / channels),
        so that a written (rounded) policy always maps back to the very same widths."""
        p = self.clip(policy)
        keep = {g.root: self.width(g, p.keep[g.root]) / g.channels for g in self.groups}
        return Policy(keep, p.sparsity, p.keep_float, p.granularity, p.rank, p.share)

    def uniform(self, keep: float) -> Policy:
        return self.clip(Policy({r: keep for r in self.roots}, {}, () if self.int8 else None))

    def describe(self) -> dict[str, Any]:
        return {"groups": [{"root": g.root, "members": list(g.members), "channels": g.channels} for g in self.groups],
                "layers": self.layers, "classifier": self.classifier, "keep_min": self.keep_min,
                "sparsities": list(self.sparsities), "int8": self.int8, "step": self.step,
                "int8_backend": self.int8_backend,
                **({"ranks": list(self.ranks)} if self.ranks else {}),  # only when on: old summaries unchanged
                **({"share_bits": list(self.share_bits)} if self.share_bits else {})}


def factor_rank(share: float, fan_in: int, fan_out: int) -> int | None:
    """The rank keeping ``share`` of a layer's params/MACs, lowrank's own ``params_keep`` rule:
    ``max(1, floor(share * fan_in * fan_out / (fan_in + fan_out)))`` (fan_in = c_in * k); None
    when no rank below ``min(fan_in, fan_out)`` exists (the pair would save nothing)."""
    r = max(1, math.floor(share * fan_in * fan_out / (fan_in + fan_out)))
    return r if r < min(fan_in, fan_out) else None


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_space(model: nn.Module, task: Task, keep_min: float = 0.25, sparsities: tuple[float, ...] = (),
                int8: bool = False, ignore: tuple[str, ...] = (), step: int | None = 8,
                int8_backend: str = "onnxruntime", ranks: tuple[float, ...] = (),
                share_bits: tuple[int, ...] = ()) -> SearchSpace:
    """The space of ``model``: one group per set of coupled channels (from the dependency
    graph; the classifier's outputs and ``ignore``d layers are never pruned); ``shapes`` holds
    the layers lowrank can factorize (its own test), the classifier excepted."""
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
    classifier = names.get(head) if head is not None else None
    return SearchSpace(groups, layers, classifier, keep_min, tuple(sparsities), int8, step, int8_backend,
                       tuple(ranks), tuple(share_bits), _lowrank_shapes(model, layers, classifier))


def _lowrank_shapes(model: nn.Module, layers: list[str], classifier: str | None) -> dict[str, tuple[int, int, int]]:
    """layer -> (c_in, c_out, k) of every layer ``lowrank`` factorizes (its own checks)."""
    from ..lowrank import factorizable_names

    ok, out = factorizable_names(model), {}
    for n in layers:
        m = model.get_submodule(n)
        if n != classifier and n in ok:
            out[n] = (int(m.weight.shape[1]), int(m.weight.shape[0]), int(m.weight[0, 0].numel()))
    return out


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

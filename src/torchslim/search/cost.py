"""What a policy costs: MACs and parameters exactly, latency from a table measured on this machine.

Latency follows HAQ's "hardware feedback": every Conv/Linear layer is timed alone on this CPU,
in PyTorch eager, at the thread count and batch size of the measurement, at a grid of input x
output widths (one table per distinct layer shape; candidates interleaved in the same repeats,
``measure_latency.compare_latency``). A policy's latency is the sum of its layers' bilinearly
interpolated times plus the rest of the model (norms, activations, adds, pooling): the
table's ratio is calibrated against the whole model timed end to end at three uniform and
six random mixed widths
interleaved with the full one (a monotone curve from the table's ratio to the measured one: isotonic regression).
All table entries are timed in one interleaved round-robin and made monotone in width. ``check`` times real pruned models
against the baseline and reports the table's error; unstructured sparsity runs on dense kernels
here, so it changes non-zeros, never latency. Low-rank factorization and weight sharing are
priced in ``lowrank_cost`` (a measured per-layer factor; sharing: no latency change).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.measure import count_nonzeros, count_params
from ..core.measure.latency import compare_latency
from ..core.measure.timing import timing_warnings
from ..core.task import Task, call_model
from ..core.utils import removing
from ..pruning import graph
from ..pruning.structured import layer_macs
from . import lowrank_cost
from .space import Policy, SearchSpace


def materialize(model: nn.Module, space: SearchSpace, policy: Policy, example: Any) -> nn.Module:
    """A physically pruned copy with the policy's widths (which channels go is irrelevant to
    cost: the highest-indexed ones), its factorized layers really factorized (``lowrank``'s own
    SVD, ``lowrank_cost.factorize``) and its unstructured sparsity as zeros; for counting/timing.
    Weight sharing is not applied (it changes bytes, counted by ``counts``, not the shapes)."""
    out = copy.deepcopy(model).eval()
    plan = {g.root: list(range(space.width(g, policy.keep.get(g.root, 1.0)), g.channels)) for g in space.groups}
    if any(plan.values()):
        graph.prune_plan(out, plan, example)
    lowrank_cost.factorize(out, space, policy, example)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for layer, s in policy.sparsity.items():
            w = params.get(f"{layer}.weight")
            if w is not None and s > 0:
                k = round(w.numel() * s)
                idx = w.detach().abs().flatten().argsort()[:k]
                w.view(-1)[idx] = 0.0
    return out


def _wire(space: SearchSpace) -> dict[str, tuple[str | None, str | None]]:
    """layer -> (group root its inputs follow, group root its outputs follow)."""
    return space.wire()


def _layer_like(mod: nn.Module, c_in: int, c_out: int) -> nn.Module:
    if isinstance(mod, nn.Linear):
        return nn.Linear(c_in, c_out, bias=mod.bias is not None)
    groups = c_in if mod.groups == mod.in_channels and mod.groups > 1 else mod.groups
    return type(mod)(c_in, c_out, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                     dilation=mod.dilation, groups=groups, bias=mod.bias is not None)


@dataclass
class CostModel:
    """Exact MACs (closed form per layer: MACs are bilinear in the kept in x out widths) and a
    measured latency table; ``cost(policy)`` gives ratios to the unpruned model."""

    space: SearchSpace
    base_macs: dict[str, int]
    base_widths: dict[str, tuple[int, int]]
    wire: dict[str, tuple[str | None, str | None]]
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> {in, out, ms}
    # measured ratio as a monotone function of the table's ratio: [table ratios], [measured]
    curve: list[list[float]] = field(default_factory=lambda: [[0.0, 1.0], [0.0, 1.0]])
    calibration: list[dict[str, float]] = field(default_factory=list)
    base_ms: float = 0.0
    notes: list[str] = field(default_factory=list)
    int8: Any = None  # int8_cost.Int8Table: prices policies with an int8 stage (ORT kernels)

    def widths(self, policy: Policy) -> dict[str, tuple[int, int]]:
        by_root = {g.root: self.space.width(g, policy.keep.get(g.root, 1.0)) for g in self.space.groups}
        out = {}
        for layer, (c_in, c_out) in self.base_widths.items():
            gi, go = self.wire.get(layer, (None, None))
            out[layer] = (by_root[gi] if gi else c_in, by_root[go] if go else c_out)
        return out

    def macs(self, policy: Policy) -> float:
        """Exact MACs: a factorized layer's are its pruned-width MACs times the pair's share
        (``lowrank_cost.mac_factor``)."""
        w = self.widths(policy)
        f = lowrank_cost.mac_factor(self.space, policy) if policy.rank else {}
        return float(sum(m * (w[n][0] / self.base_widths[n][0]) * (w[n][1] / self.base_widths[n][1]) * f.get(n, 1.0)
                         for n, m in self.base_macs.items()))

    def latency_ms(self, policy: Policy) -> float:
        """The table's time: each layer's interpolated time, a factorized layer's times its
        measured pair factor (``lowrank_cost``); share bits change nothing (dense kernels)."""
        w = self.widths(policy)
        ranks = self.space.ranks_of(policy) if policy.rank else {}
        total = 0.0
        for layer, t in self.tables.items():
            ms = lowrank_cost.interp(t, "ms", *w[layer])
            total += ms * lowrank_cost.time_factor(t, policy.rank[layer]) if layer in ranks else ms
        return total

    def int8_table_ratio(self, policy: Policy) -> float:
        """The int8 table's ratio of a policy with an int8 stage: shared and factorized layers
        stay float there (``SearchSpace.float_layers``); a factorized layer is priced at the
        table's ONNX Runtime fp32 time times its pair factor (measured in eager fp32: an
        approximation the end-to-end check corrects)."""
        w = self.widths(policy)
        t8 = self.int8.table_ratio(w, self.space.float_layers(policy), policy.granularity or "per_channel")
        for layer in self.space.ranks_of(policy) if policy.rank else {}:
            if layer in self.int8.tables:
                f = lowrank_cost.time_factor(self.tables.get(layer), policy.rank[layer])
                t8 += (f - 1.0) * lowrank_cost.interp(self.int8.tables[layer], "fp32", *w[layer]) / self.int8.eager_ms
        return t8

    def table_ratio(self, policy: Policy) -> float:
        """The table's latency ratio to the unpruned model, before the calibration curve."""
        return self.latency_ms(policy) / self.latency_ms(Policy({r: 1.0 for r in self.space.roots}))

    def cost(self, policy: Policy) -> dict[str, float]:
        full = Policy({r: 1.0 for r in self.space.roots})
        out = {"macs_ratio": self.macs(policy) / max(self.macs(full), 1.0)}
        # Beyond the curve's last point (the full model) the ratio grows in proportion: only
        # factorized layers (a pair can be slower than its dense layer) get there, so policies
        # without ranks keep their prices (the int8 curve's clamp there stays as it was)
        if self.tables and policy.keep_float is not None and self.int8 is not None:
            t8, (xs, ys) = self.int8_table_ratio(policy), self.int8.curve
            beyond = policy.rank and t8 > xs[-1]
            out["latency_ratio"] = t8 * ys[-1] / xs[-1] if beyond else self.int8.ratio(t8)
        elif self.tables:
            table = self.table_ratio(policy)
            xs, ys = self.curve
            # inside the calibrated range: the curve; below it: proportional to its first point
            out["latency_ratio"] = (float(np.interp(table, xs, ys)) if xs[0] <= table <= xs[-1] else
                                    table * (ys[0] / max(xs[0], 1e-12) if table < xs[0] else ys[-1] / xs[-1]))
        return out

    def counts(self, model: nn.Module, policy: Policy, example: Any) -> dict[str, int]:
        """Exact parameters, non-zeros and stored weight bytes of the policy's model (counted on
        a materialized copy; bytes: ``lowrank_cost.weight_bytes``, fp32 / int8 / shared)."""
        m = materialize(model, self.space, policy, example)
        return {"params": count_params(m), "nonzeros": count_nonzeros(m),
                "bytes": lowrank_cost.weight_bytes(m, self.space, policy)}

    def to_dict(self) -> dict[str, Any]:
        return {"tables": self.tables, "curve": self.curve,
                "calibration": self.calibration,
                "base_ms": self.base_ms, "notes": self.notes,
                **({"int8": self.int8.to_dict()} if self.int8 is not None else {})}


def _layer_inputs(model: nn.Module, inputs: Any) -> dict[str, tuple[int, ...]]:
    names = graph.module_names(model)
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(mod: nn.Module, inp: Any, _out: Any) -> None:  # returns None: the output is untouched
        shapes.setdefault(names[mod], tuple(inp[0].shape))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, graph.ROOT_TYPES)]
    with removing(hooks), torch.no_grad():
        call_model(model, inputs)
    return shapes



def layer_layouts(cm: CostModel, mods: dict[str, nn.Module], shapes: dict[str, tuple], grid: int
                  ) -> tuple[dict[str, tuple], dict[tuple, tuple[nn.Module, list[int], list[int], int, tuple]]]:
    """(layer -> its table key, key -> (module, input widths, output widths, batch, spatial dims)):
    the grid of widths each searched layer can take; layers of the same kind and shape share one
    key, so each distinct table is measured once (the fp32 table here, the int8 one in int8_cost)."""
    space = cm.space
    by_root = {g.root: g for g in space.groups}
    keys: dict[str, tuple] = {}
    layouts: dict[tuple, tuple[nn.Module, list[int], list[int], int, tuple]] = {}
    for layer in space.layers:
        if layer not in shapes:
            continue
        mod, (c_in, c_out) = mods[layer], cm.base_widths[layer]
        gi, go = cm.wire[layer]
        ins = _grid(space.widths(by_root[gi]), grid) if gi else [c_in]
        outs = _grid(space.widths(by_root[go]), grid) if go else [c_out]
        spatial = tuple(shapes[layer][2:]) if not isinstance(mod, nn.Linear) else ()
        keys[layer] = (repr(mod), tuple(ins), tuple(outs), shapes[layer][0], spatial)
        layouts.setdefault(keys[layer], (mod, ins, outs, shapes[layer][0], spatial))
    return keys, layouts

def _grid(widths: list[int], most: int) -> list[int]:
    """All legal widths when there are at most ``most``, else ``most`` of them evenly spread."""
    if len(widths) <= most:
        return widths
    idx = np.unique(np.round(np.linspace(0, len(widths) - 1, most)).astype(int))
    return [widths[i] for i in idx]


def _basis(res: dict[str, dict[str, Any]]) -> str:
    return "p10_ms" if timing_warnings(res) else "median_ms"


def build_cost_model(model: nn.Module, space: SearchSpace, task: Task, batch_size: int = 256,
                     threads: int | None = 1, grid: int = 9, repeats: int = 7, latency: bool = True) -> CostModel:
    """Measure the latency table of ``model`` on this machine (see module doc), at up to
    ``grid`` legal widths per side (all of them by default for 64 channels in steps of 8); ``latency=False``
    gives the exact MACs part only (no timing)."""
    model = model.eval()
    example1 = task.example_inputs(batch_size=1)
    cm = CostModel(space, layer_macs(model, example1), graph.layer_widths(model), _wire(space))
    if not latency:
        return cm
    inputs = task.example_inputs(batch_size=batch_size)
    shapes = _layer_inputs(model, inputs)
    mods = dict(model.named_modules())
    keys, layouts = layer_layouts(cm, mods, shapes, grid)
    # Every entry of every table in ONE interleaved round-robin: a load spike then stretches all
    # entries alike instead of one layer's table, so ratios between layers stay consistent.
    cands, xs = {}, {}
    for k, (mod, ins, outs, batch, spatial) in enumerate(layouts.values()):
        for a in ins:
            x = xs.setdefault((batch, a, spatial), torch.randn(batch, a, *spatial))
            for b in outs:
                torch.manual_seed(0)
                lay = _layer_like(mod, a, b).eval()
                cands[f"{k}:{a}x{b}"] = (lambda lay=lay, x=x: lay(x))
    pairs, plan = lowrank_cost.pair_candidates(space, keys, layouts, xs)  # with ranks: pair vs dense layer
    res = compare_latency({**cands, **pairs}, warmup=2, repeats=repeats, threads=threads)
    basis = _basis(res)
    cm.notes += [f"table: {w}" for w in timing_warnings(res)]
    tables, factors = {}, lowrank_cost.pair_factors(res, basis, plan)
    for k, (key, (_, ins, outs, _, _)) in enumerate(layouts.items()):
        ms = np.asarray([[res[f"{k}:{a}x{b}"][basis] for b in outs] for a in ins])
        # a wider layer is never faster: noise that says otherwise is removed (running max
        # along both axes), so the table is monotone like the cost it stands for
        ms = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)
        tables[key] = {"in": ins, "out": outs, "ms": ms.tolist()}
        if k in factors:
            tables[key]["lowrank"] = factors[k]
    cm.tables = {layer: tables[key] for layer, key in keys.items()}
    _calibrate_rest(cm, model, space, inputs, threads, repeats)
    return cm


def _calibrate_rest(cm: CostModel, model: nn.Module, space: SearchSpace, inputs: Any, threads, repeats) -> None:
    """Time the whole model at three narrower uniform widths and six random mixed ones,
    interleaved with the full model (interleaved ratios survive a busy machine better than
    times), and map the table's ratio to the measured one by a monotone curve through them."""
    example1 = inputs[:1] if isinstance(inputs, torch.Tensor) else inputs
    keeps = sorted(set(np.linspace(space.keep_min, 1.0, 4)[:-1].round(6)))
    rng = np.random.default_rng(0)  # mixed widths too: those are what a search proposes
    pols = [space.uniform(k) for k in keeps] + [
        space.clip(Policy({r: float(v) for r, v in zip(space.roots, rng.uniform(space.keep_min, 1.0, len(space.roots)))}))
        for _ in range(6)]
    cands = {"full": lambda: call_model(model, inputs)}
    for i, p in enumerate(pols):
        m = materialize(model, space, p, example1)
        cands[f"u{i}"] = lambda m=m: call_model(m, inputs)
    res = compare_latency(cands, warmup=2, repeats=max(repeats, 9), threads=threads)
    basis = _basis(res)
    cm.notes += [f"calibration: {w}" for w in timing_warnings(res)]
    cm.curve = [[0.0, 1.0], [0.0, 1.0]]
    full = cm.latency_ms(Policy({r: 1.0 for r in space.roots}))
    x = [cm.latency_ms(p) / full for p in pols]
    y = [res[f"u{i}"][basis] / res["full"][basis] for i in range(len(pols))]
    cm.calibration = [{"keep": p.to_dict()["keep"], "table_ratio": float(xi), "measured_ratio": float(yi)}
                      for p, xi, yi in zip(pols, x, y)]
    fit_curve(cm)
    cm.base_ms = float(res["full"][basis])


def fit_curve(cm: CostModel) -> None:
    """(Re)fit ``cm.curve`` through every point of ``cm.calibration`` (table ratio -> measured
    ratio); ``verify.recalibrate`` adds the end-to-end checks of chosen policies as points."""
    x = np.asarray([c["table_ratio"] for c in cm.calibration]) - 1.0
    y = np.asarray([c["measured_ratio"] for c in cm.calibration]) - 1.0
    # a monotone map from table ratio to measured ratio (scikit-learn's isotonic regression,
    # through the full model's (1, 1)): on this kind of CPU, narrow mixed widths run relatively
    # slower inside the model than alone, a curve no single scale or line follows
    from sklearn.isotonic import IsotonicRegression

    xs, ys = np.append(x + 1.0, 1.0), np.append(y + 1.0, 1.0)
    # an end-to-end check of a chosen policy (27 interleaved repeats, at the very widths that
    # matter) weighs 4 calibration points: where it disagrees with them, the curve moves to it
    w = [4.0 if c.get("source") == "check" else 1.0 for c in cm.calibration]
    iso = IsotonicRegression(y_min=0.0, increasing=True, out_of_bounds="clip").fit(xs, ys, np.append(w, 5.0))
    # the full model is the reference: its ratio is 1 by definition, and the pooled fit can land
    # a little off it when a narrow model timed slower than full (noise on a busy machine); the
    # curve is pinned there and kept monotone below it (a narrower model never predicted slower)
    cx = [float(v) for v in iso.X_thresholds_]
    cy = [min(float(v), 1.0) if xv < 1.0 else 1.0 for xv, v in zip(cx, iso.y_thresholds_)]
    if cx[-1] < 1.0:
        cx, cy = [*cx, 1.0], [*cy, 1.0]
    cm.curve = [cx, cy]


def check(cm: CostModel, model: nn.Module, policies: list[Policy], task: Task, batch_size: int = 256,
          threads: int | None = 1, repeats: int = 15) -> list[dict[str, Any]]:
    """Predicted vs measured latency ratio (each pruned model timed interleaved with the
    baseline); one row per policy with the relative error of the prediction."""
    inputs, example1 = task.example_inputs(batch_size=batch_size), task.example_inputs(batch_size=1)
    model = model.eval()
    rows = []
    for i, p in enumerate(policies):
        pruned = materialize(model, cm.space, p, example1)
        res = compare_latency({"base": lambda: call_model(model, inputs),
                               "pruned": lambda pruned=pruned: call_model(pruned, inputs)},
                              warmup=2, repeats=repeats, threads=threads)
        basis = _basis(res)
        measured = res["pruned"][basis] / res["base"][basis]
        predicted = cm.cost(p)["latency_ratio"]
        rows.append({"policy": i, "predicted_ratio": predicted, "measured_ratio": measured,
                     "rel_error": (predicted - measured) / measured, "basis": basis.removesuffix("_ms"),
                     "warnings": timing_warnings(res)})
    return rows

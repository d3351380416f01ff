"""int8 latency, priced per layer by the real int8 kernels of this ISA (ONNX Runtime, static QDQ).

A policy with an int8 stage ships as an ONNX Runtime graph (``QuantConfig(backend="onnxruntime",
mode="static")``): each quantized Conv/Linear runs ORT's int8 kernel (QLinearConv / QGemm,
VNNI or AMX where the CPU has them) at the weight granularity the policy chose, each keep-float
layer ORT's fp32 kernel. So, as HAQ's hardware feedback, every layer layout is built alone at a
grid of in x out widths three times (ORT fp32, ORT int8 per channel, ORT int8 per tensor) and
all of them are timed in one interleaved round-robin together with the eager fp32 layers at full
width (the baseline's own kernels: the ratio's denominator). A policy's table ratio is the sum
of its layers' interpolated times over that denominator; a monotone curve (``cost.fit_curve``)
maps it to the ratio measured end to end: whole ORT int8 models at a few uniform widths timed
interleaved with the eager baseline (one ORT call instead of one per layer, fused adds and
activations: the curve absorbs that). ``verify`` times the chosen int8 policy's real ORT model.

Measured on the AMX machine (issue 13's probe): ORT *dynamic* int8 Conv1d (ConvInteger) is
3-4x slower than fp32 there, so only static QDQ is priced; a CPU without VNNI gets ORT's 7-bit
weights (``isa_plan``), priced as they run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..core.measure.latency import compare_latency
from ..core.measure.timing import timing_warnings
from ..core.task import Task, call_model
from .cost import CostModel, _layer_inputs, _layer_like, fit_curve, layer_layouts, materialize
from .space import GRANULARITIES, Policy

KINDS = ("fp32", *GRANULARITIES)


@dataclass
class Int8Table:
    """layer -> {in, out, fp32, per_channel, per_tensor: ms grids}; ``eager_ms``: the eager
    fp32 layers at full width in the same round-robin (the denominator); curve/calibration as
    in ``CostModel``."""

    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    eager_ms: float = 1.0
    curve: list[list[float]] = field(default_factory=lambda: [[0.0, 1.0], [0.0, 1.0]])
    calibration: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table_ratio(self, widths: dict[str, tuple[int, int]], keep_float: tuple[str, ...], granularity: str) -> float:
        total = 0.0
        for layer, t in self.tables.items():
            ci, co = widths[layer]
            ms = np.asarray(t["fp32" if layer in keep_float else granularity])
            row = [float(np.interp(co, t["out"], ms[i])) for i in range(len(t["in"]))]
            total += float(np.interp(ci, t["in"], row))
        return total / self.eager_ms

    def ratio(self, table: float) -> float:
        xs, ys = self.curve
        return float(np.interp(table, xs, ys)) if table >= xs[0] else table * ys[0] / max(xs[0], 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"tables": self.tables, "eager_ms": self.eager_ms, "curve": self.curve,
                "calibration": self.calibration, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Table:
        return cls(d["tables"], d["eager_ms"], d["curve"], d["calibration"], d.get("notes", []))


def granularity_of(policy: Policy) -> str:
    return policy.granularity or "per_channel"


def table_ratio(cm: CostModel, policy: Policy) -> float:
    assert cm.int8 is not None and policy.keep_float is not None
    return cm.int8_table_ratio(policy)  # shared / factorized layers priced as cost() prices them


def _data_task(x: torch.Tensor) -> Task:
    """A task whose train split feeds ``x`` (calibration data for one layer's activations)."""
    dl = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=len(x))
    return Task("layer", test=dl, train=dl)


def ort_int8(model: nn.Module, example: Any, task: Task, granularity: str, keep_float: tuple[str, ...] = (),
             threads: int | None = 1) -> nn.Module:
    """``model`` as an ONNX Runtime static int8 graph (float: ``keep_float`` layers)."""
    from ..core.selection import LayerSelection
    from ..quantization.ort_backend import OrtQuantConfig, ort_quantize

    cfg = OrtQuantConfig(mode="static", per_channel=granularity == "per_channel", optimize=False,
                         layers=LayerSelection(exclude=tuple(keep_float)), batches=2)  # exclude = kept float
    return ort_quantize(model, example, cfg, task, threads=threads).model


def build_int8_table(cm: CostModel, model: nn.Module, task: Task, batch_size: int = 256, threads: int | None = 1,
                     grid: int = 3, repeats: int = 5) -> Int8Table:
    """Measure the int8 table of ``model`` on this machine (see module doc) and calibrate it."""
    from ..quantization.ort_backend import ort_fp32

    model = model.eval()
    inputs = task.example_inputs(batch_size=batch_size)
    shapes = _layer_inputs(model, inputs)
    mods = dict(model.named_modules())
    keys, layouts = layer_layouts(cm, mods, shapes, grid)
    cands: dict[str, Any] = {}
    for k, (mod, ins, outs, _, spatial) in enumerate(layouts.values()):
        for a in ins:
            x = torch.randn(batch_size, a, *spatial).relu()
            calib = _data_task(x[: min(64, batch_size)])
            for b in outs:
                torch.manual_seed(0)
                lay = nn.Sequential(_layer_like(mod, a, b).eval())
                f32 = ort_fp32(lay, x[:1], optimize=False, threads=threads)
                cands[f"{k}:{a}x{b}:fp32"] = (lambda m=f32, x=x: m(x))
                for g in GRANULARITIES:
                    q = ort_int8(lay, x[:1], calib, g, threads=threads)
                    cands[f"{k}:{a}x{b}:{g}"] = (lambda m=q, x=x: m(x))
    eager = {}
    for layer in keys:  # the baseline's eager kernels at full width, in the same repeats
        lay, x = copy.deepcopy(mods[layer]).eval(), torch.randn(*shapes[layer])
        eager[layer] = f"eager:{layer}"
        cands[eager[layer]] = (lambda m=lay, x=x: m(x))
    res = compare_latency(cands, warmup=2, repeats=repeats, threads=threads)
    basis = "p10_ms" if timing_warnings(res) else "median_ms"
    out = Int8Table(notes=[f"int8 table: {w}" for w in timing_warnings(res)])
    grids = {}
    for k, (key, (_, ins, outs, _, _)) in enumerate(layouts.items()):
        entry = {"in": ins, "out": outs}
        for kind in KINDS:
            ms = np.asarray([[res[f"{k}:{a}x{b}:{kind}"][basis] for b in outs] for a in ins])
            entry[kind] = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1).tolist()
        grids[key] = entry
    out.tables = {layer: grids[key] for layer, key in keys.items()}
    out.eager_ms = float(sum(res[n][basis] for n in eager.values()))
    _calibrate(out, cm, model, task, inputs, threads, repeats)
    return out


def _calibrate(t8: Int8Table, cm: CostModel, model: nn.Module, task: Task, inputs: Any, threads, repeats) -> None:
    """Whole ORT int8 models (every layer int8, per channel) at uniform widths, timed
    interleaved with the eager baseline: the points of the table -> measured curve."""
    space = cm.space
    example1 = task.example_inputs(batch_size=1)
    pols = [Policy(space.uniform(k).keep, {}, (), "per_channel")
            for k in sorted(set(np.linspace(space.keep_min, 1.0, 3).round(6)))]
    cands = {"base": lambda: call_model(model, inputs)}
    for i, p in enumerate(pols):
        q = ort_int8(materialize(model, space, p, example1), example1, task, "per_channel", threads=threads)
        cands[f"p{i}"] = (lambda q=q: call_model(q, inputs))
    res = compare_latency(cands, warmup=2, repeats=max(repeats, 7), threads=threads)
    basis = "p10_ms" if timing_warnings(res) else "median_ms"
    t8.notes += [f"int8 calibration: {w}" for w in timing_warnings(res)]
    t8.calibration = [{"keep": p.to_dict()["keep"], "granularity": "per_channel",
                       "table_ratio": t8.table_ratio(cm.widths(p), (), "per_channel"),
                       "measured_ratio": res[f"p{i}"][basis] / res["base"][basis]} for i, p in enumerate(pols)]
    fit_curve(t8)

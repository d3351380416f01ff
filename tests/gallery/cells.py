"""One cell of the conformance matrix: run a technique on a gallery model and judge it with the
checks of checks.py (whose docstring says what makes a cell supported or refused)."""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import torchslim as ts
from torchslim.core.errors import TorchslimError
from torchslim.core.measure import count_params
from torchslim.core.measure.latency import count_macs

from .checks import (
    INT8_BOUND,
    MEASURE_FAST,
    CellError,
    Ctx,
    Outcome,
    _layer_of,
    _params_changed,
    _resolve,
    _skipped_names,
    candidate_layers,
    check_output_like,
    check_skips,
    check_ties,
    forward,
    module_macs,
    rel_error,
)
from .models import GALLERY

# ----------------------------------------------------------------------------- techniques
QUANT_SKIP = ("head",)


def _quant_cfg(backend: str, model_name: str) -> ts.QuantConfig:
    """int8 static, 2 calibration batches. The config-edge model (``mlp_config_edges``) keeps its
    head float (QuantConfig.layers.exclude) and calibrates on its whole train split, whose last batch is
    smaller (8, 8, 4); the cell checks that the head stays float."""
    if model_name == "mlp_config_edges":
        return ts.QuantConfig(backend=backend, batches=3, layers={"exclude": QUANT_SKIP})
    return ts.QuantConfig(backend=backend, batches=2)


def _check_quant(ctx: Ctx, out: Any) -> str:
    err = rel_error(ctx.ref_out, out)
    named = [w for w in ctx.warnings if "static calibration saw only" in w]
    if math.isfinite(err) and err > INT8_BOUND and named:
        # the calibration data cannot cover the inputs (too few samples): a named deviation
        ctx.status = "warned"
        return f"int8 output error {err:.3f} > bound {INT8_BOUND}, named: {named[0][:120]}"
    if not math.isfinite(err) or err > INT8_BOUND:
        raise CellError(f"int8 output error {err:.3f} > bound {INT8_BOUND}")
    info = ctx.result.info
    floats = set(info.get("float_layers", {}))
    pats = tuple(ctx.cfg.layers.exclude) if hasattr(ctx.cfg, "layers") else ()
    skip = {n for n in candidate_layers(ctx.ref) if any(fnmatch.fnmatchcase(n, p) for p in pats)}
    backend = info.get("backend", "simulate")
    model = ctx.result.model
    if backend == "simulate":
        from torchslim.quantization.fake import FakeQuantLayer

        handled = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)}
        if handled & skip:
            raise CellError(f"QuantConfig.layers.exclude ignored (simulate): {', '.join(sorted(handled & skip))} quantized")
        check_skips(ctx, handled, floats | skip, "int8 (simulate)")
    elif backend == "torchao":
        handled = set()
        for n, m in model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor):
                cls = type(w.data) if isinstance(w, nn.Parameter) else type(w)
                if cls is not torch.Tensor:
                    handled.add(n)
        if handled & skip:
            raise CellError(f"QuantConfig.layers.exclude ignored by torchao: {', '.join(sorted(handled & skip))} quantized")
        check_skips(ctx, handled, floats | skip, "int8 (torchao)")
        n_claim = info.get("quantized_layers")
        if n_claim is not None and n_claim != len(handled):
            raise CellError(f"torchao claims {n_claim} quantized layers, {len(handled)} carry int8 weights")
    elif backend == "onnxruntime" and skip and not info.get("excluded_nodes"):
        raise CellError(f"QuantConfig.layers.exclude ignored by ONNX Runtime: {', '.join(sorted(skip))} "
                        "matched, no node excluded")
    return f"{backend}, rel. error {err:.3f}" + (f", float: {', '.join(sorted(skip))}" if skip else "")


def _run_quant(backend: str) -> Callable[[Ctx], StageOrOutcome]:
    def run(ctx: Ctx):
        ctx.cfg = _quant_cfg(backend, ctx.name)
        return ts.quantize(ctx.model, ctx.cfg, ctx.task)
    return run


StageOrOutcome = Any


def _run_prune(ctx: Ctx):
    ctx.cfg = ts.PruneConfig(sparsity=0.5)
    return ts.prune(ctx.model, ctx.cfg, ctx.task)


def _check_prune(ctx: Ctx, out: Any) -> str:
    info = ctx.result.info
    handled = {_layer_of(r["layer"]) for r in info.get("layers", [])}
    check_skips(ctx, handled, _skipped_names(info), "pruning")
    model = ctx.result.model
    for r in info.get("layers", []):
        t = _resolve(model, r["layer"])
        if isinstance(t, torch.Tensor) and int((t != 0).sum()) > r["kept"]:
            raise CellError(f"{r['layer']}: {int((t != 0).sum())} non-zeros, claimed kept {r['kept']}")
    return f"sparsity {info.get('sparsity', float('nan')):.2f} over {len(handled)} layers"


def _run_nm(ctx: Ctx):
    ctx.cfg = ts.NMConfig(n=2, m=4)
    return ts.prune(ctx.model, ctx.cfg, ctx.task)


def _check_nm(ctx: Ctx, out: Any) -> str:
    info = ctx.result.info
    handled = {_layer_of(r["layer"]) for r in info.get("layers", [])}
    check_skips(ctx, handled, _skipped_names(info), "N:M pruning")
    for r in info.get("layers", []):
        t = _resolve(ctx.result.model, r["layer"])
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] % 4 == 0:
            groups = (t.detach().movedim(1, -1).reshape(-1, 4) != 0).sum(-1)  # groups along inputs
            if int(groups.max()) > 2:
                raise CellError(f"{r['layer']}: a group of 4 has {int(groups.max())} non-zeros (2:4 claimed)")
    return f"2:4 on {len(handled)} layers"


def _run_structured(ctx: Ctx):
    ctx.cfg = ts.StructuredPruneConfig(macs_keep=0.5)
    return ts.prune(ctx.model, ctx.cfg, ctx.task)


def _check_structured(ctx: Ctx, out: Any) -> str:
    info, model = ctx.result.info, ctx.result.model
    one = ctx.task.example_inputs(batch_size=1)
    real_before, real_after = count_macs(ctx.ref, one), count_macs(model, one)
    if info.get("macs_after") is not None and info["macs_after"] != real_after:
        raise CellError(f"claimed MACs {info['macs_after']} != measured {real_after}")
    floor = module_macs(model, one)
    if real_after < floor:
        raise CellError(f"pruned model: claimed/measured {real_after} MACs, but its Linear/Conv/attention "
                        f"layers alone do {floor} (the MAC count misses layers)")
    claimed_ratio = info.get("macs_ratio")
    if claimed_ratio is not None and abs(claimed_ratio - real_after / max(real_before, 1)) > 0.02:
        raise CellError(f"claimed MACs x{claimed_ratio:.2f}, measured x{real_after / max(real_before, 1):.2f}")
    if info.get("params_after") is not None and info["params_after"] != count_params(model):
        raise CellError(f"claimed params {info['params_after']} != measured {count_params(model)}")
    return f"MACs x{real_after / max(real_before, 1):.2f}"


def _run_transformer(ctx: Ctx):
    ctx.cfg = ts.TransformerPruneConfig(heads_prune=0.5, ffn_prune=0.5, batches=1)
    return ts.prune(ctx.model, ctx.cfg, ctx.task)


def _check_params_shrank(ctx: Ctx, out: Any) -> str:
    before, after = count_params(ctx.ref), count_params(ctx.result.model)
    if after >= before:
        raise CellError(f"reported success but parameters did not shrink ({before} -> {after})")
    return f"params x{after / before:.2f}"


def _run_layer_drop(ctx: Ctx):
    ctx.cfg = ts.pruning.LayerDropConfig(count=1, batches=1)
    return ts.prune(ctx.model, ctx.cfg, ctx.task)


def _run_share(ctx: Ctx):
    ctx.cfg = ts.ShareConfig(bits=4, max_iter=20)
    return ts.cluster(ctx.model, ctx.cfg, ctx.task)


def _check_share(ctx: Ctx, out: Any) -> str:
    info, model = ctx.result.info, ctx.result.model
    layers = info.get("layers", {})
    for n in layers:
        m = _resolve(model, n)
        w = getattr(m, "weight", None)
        # 2**bits centroids, plus exact zeros kept apart (keep_zeros, e.g. an embedding's padding row)
        if isinstance(w, torch.Tensor) and w.numel() and torch.unique(w.detach()).numel() > 17:
            raise CellError(f"{n}: {torch.unique(w.detach()).numel()} distinct weights after 4-bit sharing")
    check_skips(ctx, set(layers), set(), "weight sharing")
    return f"4-bit codebooks on {len(layers)} layers"


def _run_lowrank(ctx: Ctx):
    # min_saved_macs 0: the cell checks the factorization (error, ties, MACs) on tiny models,
    # whose layers the default MAC rule keeps whole (tests/test_lowrank.py covers the rule)
    ctx.cfg = ts.LowRankConfig(params_keep=0.5, min_saved_macs=0)
    return ts.factorize(ctx.model, ctx.cfg, ctx.task)


def _linear_map(m: nn.Module, i: int) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            eye = torch.eye(i)
            return (m(eye) - m(torch.zeros(1, i))).T
    except Exception:  # noqa: BLE001 - not a plain (in -> out) map
        return None


def _check_lowrank(ctx: Ctx, out: Any) -> str:
    info, model = ctx.result.info, ctx.result.model
    recs = info.get("layers", [])
    for r in recs:
        if not r.get("applied") or r.get("type") != "Linear":
            continue
        before, after = _resolve(ctx.ref, r["layer"]), _resolve(model, r["layer"])
        if not isinstance(before, nn.Linear) or not isinstance(after, nn.Module):
            continue
        w = before.weight.detach()
        got = _linear_map(after, w.shape[1])
        if got is None or got.shape != w.shape:
            continue
        err = float((got - w).norm() / w.norm())
        if abs(err - r["rel_fro_error"]) > 1e-3:
            raise CellError(f"{r['layer']}: measured rel. error {err:.4f}, claimed {r['rel_fro_error']:.4f}")
    one = ctx.task.example_inputs(batch_size=1)
    saved_claim = (info.get("macs_before", 0) - info.get("macs_after", 0))
    saved_real = count_macs(ctx.ref, one) - count_macs(model, one)
    if saved_claim != saved_real:
        raise CellError(f"claimed MAC saving {saved_claim} != measured {saved_real}")
    check_skips(ctx, {r["layer"] for r in recs}, set(), "low-rank")
    return f"{sum(1 for r in recs if r.get('applied'))}/{len(recs)} layers factorized"


def _run_distill(ctx: Ctx):
    ctx.cfg = ts.DistillConfig(teacher=copy.deepcopy(ctx.ref), finetune=ts.TrainConfig(epochs=1, max_steps=2))
    return ts.distill(ctx.model, ctx.cfg, ctx.task)


def _check_trained(ctx: Ctx, out: Any) -> str:
    if not _params_changed(ctx.ref, ctx.result.model):
        raise CellError("training reported success but no parameter changed")
    return "2 steps"


def _run_fit(ctx: Ctx):
    ctx.cfg = ts.TrainConfig(epochs=1, max_steps=2)
    res = ts.fit(ctx.model, ctx.task, ctx.cfg)
    return ts.StageResult(ctx.model, {"fit": res.to_dict()})


def _run_measure(ctx: Ctx):
    ctx.cfg = ts.MeasureConfig(**MEASURE_FAST)
    rec = ts.measure(ctx.model, ctx.task, ctx.cfg)
    return ts.StageResult(ctx.model, {"record": rec})


def _check_measure(ctx: Ctx, out: Any) -> str:
    rec = ctx.result.info["record"]
    unique = sum(p.numel() for p in ctx.ref.parameters())  # parameters() counts shared ones once
    if rec.params != unique:
        raise CellError(f"measure counts {rec.params} params, the model has {unique} (ties once)")
    if not rec.macs_per_sample:
        raise CellError("measure reports 0 MACs")
    one = ctx.task.example_inputs(batch_size=1)
    floor1 = module_macs(ctx.ref, one)
    if rec.macs_per_sample < floor1:
        raise CellError(f"measure counts {rec.macs_per_sample:.0f} MACs/sample; its Linear/Conv/attention/RNN "
                        f"layers alone do {floor1}")
    # every weight matrix of a layer is used at least once per sample: MACs >= its elements
    floor = {n: sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2)
             for n, m in candidate_layers(ctx.ref).items()}
    if rec.macs_per_sample < sum(floor.values()):
        big = sorted(floor, key=floor.get, reverse=True)[:3]
        raise CellError(f"measure counts {rec.macs_per_sample:.0f} MACs/sample, fewer than the "
                        f"{sum(floor.values())} weights its layers multiply (largest: {', '.join(big)})")
    return f"{rec.params} params, {rec.macs_per_sample:.0f} MACs/sample"


@dataclass
class Technique:
    run: Callable[[Ctx], Any]
    check: Callable[[Ctx, Any], str]
    needs: tuple[str, ...] = ()


TECHNIQUES: dict[str, Technique] = {
    "measure": Technique(_run_measure, _check_measure),
    "fit": Technique(_run_fit, _check_trained),
    "prune": Technique(_run_prune, _check_prune),
    "nm": Technique(_run_nm, _check_nm),
    "structured_prune": Technique(_run_structured, _check_structured, ("torch_pruning",)),
    "transformer_prune": Technique(_run_transformer, _check_params_shrank),
    "layer_drop": Technique(_run_layer_drop, _check_params_shrank),
    "quantize": Technique(_run_quant("simulate"), _check_quant),
    "quantize_ort": Technique(_run_quant("onnxruntime"), _check_quant, ("onnxruntime", "onnx")),
    "quantize_torchao": Technique(_run_quant("torchao"), _check_quant, ("torchao",)),
    "quantize_auto": Technique(_run_quant("auto"), _check_quant),
    "share": Technique(_run_share, _check_share),
    "lowrank": Technique(_run_lowrank, _check_lowrank),
    "distill": Technique(_run_distill, _check_trained),
}


# ----------------------------------------------------------------------------- one cell
def run_cell(model_name: str, technique: str) -> Outcome:
    entry, tech = GALLERY[model_name], TECHNIQUES[technique]
    model, example, task, _ = entry.build()
    ref = copy.deepcopy(model)
    ctx = Ctx(model_name, ref, model, example, task, forward(ref, example))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ctx.result = tech.run(ctx)
        except TorchslimError as exc:
            msg = str(exc).strip()
            if "\n" in msg:
                raise CellError(f"refusal is not one line: {msg!r}") from exc
            if _params_changed(ref, model):
                raise CellError(f"refused after changing the model: {msg}") from exc
            return Outcome("refused", msg)
        new = ctx.result.model
        new.eval()  # compared as deployed (the reference is in eval mode too)
        new_out = forward(new, example)
        ctx.warnings = [str(w.message) for w in caught]
        check_output_like(ctx.ref_out, new_out)
        detail = tech.check(ctx, new_out)
        check_ties(ctx, new)
        if ctx.result.save is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.bin")
                ctx.result.save(new, path)
                size = os.path.getsize(path)
                claimed = ctx.result.info.get("file_bytes")
                # torch.save's zip names its entries after the file, so allow a few bytes
                if claimed is not None and abs(claimed - size) > 64 + 0.01 * size:
                    raise CellError(f"claimed file bytes {claimed} != saved file {size}")
                ts.measure(new, task, ts.MeasureConfig(**MEASURE_FAST), saved_path=path)
        elif technique != "measure":
            ts.measure(new, task, ts.MeasureConfig(**MEASURE_FAST))
    return Outcome(ctx.status, detail)

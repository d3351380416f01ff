"""Latency a user can trust: the shipped form, timed interleaved with the baseline, checked.

Three things made latency figures lie before (issue 9):

- a model that computes its weights on every forward while training (shared weights rebuilt
  from a codebook, any ``torch.nn.utils.parametrize`` parametrization) was timed in that form,
  though the user ships it materialized (the archive loads back as dense weights): we time
  ``shipped_form(model)``, where every parametrization is replaced by the tensor it computes;
- a stage was timed minutes after the baseline, so a load spike in between made a same-MACs
  model "170x faster": with a ``reference`` (the baseline), both are timed round-robin in the
  same repeats (``compare_latency``) and the speedup is the ratio of those medians;
- a busy machine was not reported: every timing records the spread (p10/p90) and how much CPU
  the process really got (``load``); ``timing_warnings`` turns a wide spread, a starved process
  or a busy extra thread into a warning shown in the table, the report and run.json.

Runtimes are named for what executes the graph: a model that wraps an ONNX Runtime session is
"ONNX Runtime" even when called through ``nn.Module.__call__``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..task import call_model
from ..utils import materialize_parametrized
from .latency import compare_latency, ort_runner

# what each runtime key means, for tables and reports
RUNTIME_LABELS = {"eager": "PyTorch eager", "compile": "torch.compile", "onnxruntime": "ONNX Runtime"}
SPREAD_WARN = 0.30  # (p90 - p10) / median above this: the repeats disagree too much to trust
STARVED_WARN = 0.75  # the timing thread was on a core less than 75% of the wall time
BUSY_WARN = 0.5  # the process used half a core or more beyond its timing threads


def runs_onnxruntime(model: nn.Module) -> bool:
    """True when model's forward runs an ONNX Runtime session (torchslim's OrtModel)."""
    return isinstance(getattr(model, "onnx_bytes", None), (bytes, bytearray))


def runtime_label(runtime: str, model: nn.Module | None = None) -> str:
    if runtime == "eager" and model is not None and runs_onnxruntime(model):
        return RUNTIME_LABELS["onnxruntime"]
    return RUNTIME_LABELS.get(runtime, runtime)


def shipped_form(model: nn.Module) -> tuple[nn.Module, str | None]:
    """(model as the user ships it, note). Parametrized tensors (shared weights, any
    ``torch.nn.utils.parametrize``) are materialized on a copy; the model itself is untouched.
    A model with no parametrization is returned as is."""
    from torch.nn.utils import parametrize

    found = [(n, m) for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if not found:
        return model, None
    shipped = copy.deepcopy(model)
    names = materialize_parametrized(shipped)  # safe on a copy (see there)
    note = (f"latency of the shipped form: {len(names)} parametrized tensor(s) materialized "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), as the saved file loads")
    return shipped.train(model.training), note


def _compiled_runner(model: nn.Module, inputs: Any):
    compiled = torch.compile(model)
    with torch.inference_mode():
        call_model(compiled, inputs)  # compile now, outside the timed region
    return lambda: call_model(compiled, inputs)


def runners(model: nn.Module, inputs: Any, runtimes, onnx_path, threads, notes: list[str]) -> dict[str, Any]:
    """Zero-argument callables, one per runtime that can run here (a failure is a note)."""
    out: dict[str, Any] = {}
    for rt in runtimes:
        if rt == "eager":
            out[rt] = lambda: call_model(model, inputs)
        elif rt == "compile":
            try:
                out[rt] = _compiled_runner(model, inputs)
            except Exception as exc:  # noqa: BLE001 - a missing compiler should not lose the row
                notes.append(f"compile runtime skipped: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            out[rt] = ort_runner(onnx_path, inputs, threads)
    return out


def timing_warnings(results: dict[str, dict[str, Any]]) -> list[str]:
    """Short warnings for timings not to trust as they stand (see module doc)."""
    out = []
    wide = {n: (v["p90_ms"] - v["p10_ms"]) / v["median_ms"] for n, v in results.items()
            if v.get("median_ms")}
    wide = {n: s for n, s in wide.items() if s > SPREAD_WARN}
    if wide:
        spans = ", ".join(f"{100 * s:.0f}% ({n})" for n, s in wide.items())
        out.append(f"wide spread: p10-p90 spans {spans} of the median")
    load = next((v.get("load") for v in results.values() if v.get("load")), None)
    if load:
        if load["cpu_share"] < STARVED_WARN:
            out.append(f"contended: the timing thread ran {100 * load['cpu_share']:.0f}% of the wall time "
                       "(another process or thread holds the CPU)")
        if load["extra_cores"] >= BUSY_WARN:
            out.append(f"contended: {load['extra_cores']:.1f} core(s) of other work in this process "
                       "while timing (a busy thread)")
        if load.get("other_cores") is not None and load["other_cores"] >= 0.5 and not out:
            out.append(f"busy machine: other processes used {load['other_cores']:.1f} of "
                       f"{load['cores']} cores while timing")
    return out


def time_model(model: nn.Module, inputs: Any, cfg, reference: nn.Module | None = None) -> dict[str, Any]:
    """Time model (in its shipped form) in each of cfg.runtimes; with a reference, interleave
    it (eager) in the same repeats and give speedup = reference median / model median.

    Returns {latency, speedup, speedup_basis, reference_latency, runtime_labels, warnings,
    notes}."""
    notes: list[str] = []
    shipped, note = shipped_form(model)
    if note:
        notes.append(note)
    cands = runners(shipped.eval(), inputs, cfg.runtimes, cfg.onnx_path, cfg.threads, notes)
    ref_key = None
    if reference is not None:
        ref_shipped, _ = shipped_form(reference)
        ref_shipped.eval()
        ref_key = "__reference__"
        cands[ref_key] = lambda: call_model(ref_shipped, inputs)
    res = compare_latency(cands, cfg.warmup, cfg.repeats, cfg.threads)
    ref = res.pop(ref_key) if ref_key else None
    warnings = timing_warnings({**res, **({"baseline": ref} if ref else {})})
    # Contention stretches a random share of the samples (a descheduled sample waits a whole
    # time slice), so under load the median mixes slowed and clean runs unevenly between the
    # candidates, while the fastest decile stays close to the uncontended time: then (and
    # only then) the speedup is the ratio of p10s, and the row says so.
    basis = "p10_ms" if warnings else "median_ms"
    return {
        "latency": res,
        "runtime_labels": {rt: runtime_label(rt, model) for rt in res},
        "speedup": {rt: ref[basis] / v[basis] for rt, v in res.items()} if ref else {},
        "speedup_basis": basis.removesuffix("_ms") if ref else None,
        "reference_latency": ref,
        "notes": notes,
        "warnings": warnings,
    }

"""``torchslim search`` with ``search.space: transformer``: the most accurate plan for a BERT-style
encoder under a budget, written as a recipe ``torchslim run`` reproduces.

The space (``search.transformer_space``): per encoder layer the heads and FFN units kept (or the
whole layer dropped with ``layer_drop: true``), per Linear group int8 / float / 8-bit blocks,
SmoothQuant and graph fusion. Each plan is built through the runner's stage code, scored on the
val split and timed end to end against the fp32 model on ``timing_batches`` val batches
(``search.transformer_eval``: measured, not modelled), by Optuna TPE or random search on SQLite
(``out/search.db``, or ``search.storage``): ``--resume`` continues the study without re-running a
finished plan. The two uniform int8 plans (all groups int8 on the full widths; B2's int8 recipe:
SmoothQuant + FFN-out 8-bit blocks) are the first trials, so the search starts from the best
single-technique answer and can only improve on it.

Budgets: ``latency`` (measured ratio), ``macs`` (exact, per token), ``size`` (the plan's file over
the fp32 model's: ONNX bytes of an int8 plan, the state dict otherwise; ``{size: 20MB}`` or a
share). Under a latency budget the answer is measured again: the ``checks`` best plans within the
budget (plus ``tolerance``) are rebuilt and timed with 3x the repeats, interleaved with the fp32
model, best val first, until one holds; ``search.json`` records every check.

Outputs in ``out`` as the CNN search writes them: baseline.safetensors, trials.json,
pareto.json, best_recipe.yaml, search.json, report.html (every trial a point).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.isa import machine_facts
from ..core.utils import atomic_write_text
from ..search import transformer_eval as te
from ..search import transformer_space as ts
from ..search.trials import pareto
from .search_spec import SearchSpec, base_recipe, baseline, finetune_fields, parse_budget

KINDS = {"latency": "latency", "macs": "macs", "nonzeros": "size"}  # rules.Budget kind -> PlanEvaluator kind


def start_plans(space: ts.TransformerSpace) -> tuple[ts.TransformerPolicy, ...]:
    """The first trials: every group int8 on the full widths, fused (ORT's own int8 answer), and
    B2's int8 recipe (SmoothQuant on Q/K/V and FFN-in, FFN-out as 8-bit blocks)."""
    return ts.uniform_policy(space, quant="int8"), ts.b2_policy(space)


def _hold(ev: te.PlanEvaluator, records: list[dict[str, Any]], spec: SearchSpec, log) -> dict[str, Any]:
    """Under a latency budget: the best plans within budget x (1 + tolerance) re-timed with 3x the
    repeats, best val first, until one holds (measured ratio <= budget x (1 + tolerance))."""
    limit = ev.budget * (1 + spec.tolerance)
    seen, cands = set(), []
    for r in sorted((r for r in records if r["latency_ratio"] <= limit), key=lambda r: -r["val"]):
        k = te.plan_key(r)
        if k not in seen:
            seen.add(k)
            cands.append(r)
    checks, chosen, model = [], None, None
    for r in cands[: spec.checks]:
        policy = ts.TransformerPolicy.from_dict(r["policy"])
        m = ev.models.get(policy.key()) or ev.build(policy)
        timed = ev.time(m, repeats=3 * ev.repeats)
        ok = timed["latency_ratio"] <= limit
        checks.append({"policy": r["policy"], "val": r["val"], "search_ratio": r["latency_ratio"],
                       "measured_ratio": timed["latency_ratio"], "holds": ok,
                       "margin_pct": 100 * (1 - timed["latency_ratio"] / ev.budget), "cpu_share": timed["cpu_share"]})
        log(f"check: val {r['val']:.4f}, search {r['latency_ratio']:.3f}x, measured {timed['latency_ratio']:.3f}x "
            f"({'holds' if ok else 'over'} the {ev.budget:g}x budget)")
        if ok:
            chosen, model = dict(r, measured_latency_ratio=timed["latency_ratio"]), m
            break
    return {"chosen": chosen, "model": model, "checks": checks}


def run_transformer_search(recipe: dict[str, Any], spec: SearchSpec, out: Path, resume: bool, t0: float,
                           log=print) -> dict[str, Any]:
    """Search ``recipe``'s model in the transformer space under ``spec``; writes the outputs (module
    doc) and returns the summary (``best`` None when no plan held the budget)."""
    task, model, weights = baseline(recipe, out, resume, log)
    space = ts.build_transformer_space(model, tuple(spec.heads_keep), tuple(spec.ffn_keep), spec.ffn_multiple,
                                       drop=spec.layer_drop)
    budget = parse_budget(spec.budget, te.file_bytes(model))
    kind = KINDS[budget.kind]
    measure = recipe.get("measure") or {}
    threads = int(measure.get("threads") or 1)
    timing = [b for i, (b, _) in enumerate(task.split("val")) if i < spec.timing_batches]
    ev = te.PlanEvaluator(model, task, space, base_recipe(recipe, weights), timing, budget=budget.ratio, threads=threads,
                          repeats=spec.table.repeats, keep=spec.checks, margin=spec.tolerance, log=log, kind=kind,
                          finetune=finetune_fields(spec.finetune))
    log(f"search: transformer space, {spec.method}, {spec.trials} plan(s), budget {kind} <= {budget.ratio:.3f}x; "
        f"{len(space.layers)} encoder layers, heads {list(space.heads[0])}, FFN {list(space.ffn[0])}"
        + (", layers may be dropped" if space.drop else ""))
    from ..search.optuna_search import storage_for

    storage = storage_for(spec.storage, str(out / "search.db"))
    name = spec.study or f"torchslim-transformer-{spec.method}-{spec.seed}"
    records = te.run_tpe(ev, spec.trials, seed=spec.seed, enqueue=start_plans(space)[: spec.trials], storage=storage,
                         study_name=name, method=spec.method)
    held = _hold(ev, records, spec, log) if kind == "latency" else None
    if held is not None:
        top, top_model = held["chosen"], held["model"]
    else:
        top = te.best_feasible(records)
        top_model = None if top is None else ev.build(ts.TransformerPolicy.from_dict(top["policy"]))
    if top is not None:
        top = dict(top, test=float(task.evaluate(top_model, "test")))
    summary: dict[str, Any] = {"method": spec.method, "space": space.describe(),
                               "budget": {"kind": kind, "ratio": budget.ratio}, "trials": len(records),
                               "distinct_plans": len(ev.cache), "seconds": round(time.perf_counter() - t0, 1),
                               "best": top, "resumed_trials": sum(bool(r.get("resumed")) for r in records),
                               "machine": machine_facts(torch.get_num_threads()), "timing_threads": threads}
    if held is not None:
        summary.update(latency_checks=held["checks"], budget_held=top is not None)
        if top is not None:
            summary["measured_latency_ratio"] = top["measured_latency_ratio"]
            summary["budget_margin_pct"] = held["checks"][-1]["margin_pct"]
    atomic_write_text(out / "trials.json", json.dumps(records, indent=1, default=str))
    atomic_write_text(out / "pareto.json", json.dumps(pareto(records, te.BUDGET_KEYS[kind]), indent=1, default=str))
    (out / "best_recipe.yaml").unlink(missing_ok=True)  # only a plan within the budget is written
    if top is not None:
        plan = dict(ev.recipe(ts.TransformerPolicy.from_dict(top["policy"])),
                    name=f"best plan of a transformer {spec.method} search")
        atomic_write_text(out / "best_recipe.yaml", yaml.safe_dump(plan, sort_keys=False))
        log(f"best: val {top['val']:.4f} test {top['test']:.4f} at {top['latency_ratio']:.3f}x latency, "
            f"{top['macs_ratio']:.3f}x MACs, {top['file_mb']:.1f} MB -> {out / 'best_recipe.yaml'}")
    else:
        log("no plan within the budget was found" + (" as measured" if held is not None else ""))
    atomic_write_text(out / "search.json", json.dumps(summary, indent=1, default=str))
    try:
        from .report.search_report import write_search_report

        log(f"report: {write_search_report(summary, out)}")
    except ImportError:
        log("report: not written (needs matplotlib: pip install 'torchslim[report]'); torchslim report search.json later")
    return summary

"""The budget, held as measured: the chosen policy is timed end to end before it is written.

The latency table predicts (about 6% off on average, more on a busy CPU); a search that trusts
the prediction alone wrote winners that measured 0.53x against a 0.5x budget. So the search's
answer goes through ``enforce``: candidates are taken best first (val metric), each one is
materialized and timed interleaved with the unpruned model (``compare_latency`` round-robin,
in ``blocks`` independent blocks: the ratio is the median of the blocks' ratios and its noise
their half-range; a contended block's ratio is taken from the fastest decile, as
``measure_timing`` does). A candidate holds when its measured ratio is within the budget times
``1 + tolerance``; else its measured point is added to the table's calibration (the curve is
refitted: ``cost.fit_curve``), candidates the recalibrated table now prices over the budget are
passed over untimed, and the next one is timed; when none holds, ``hold`` refits the best
trial to the recalibrated table and times that. The result says which one holds, by how much,
and every check made.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from torch import nn

from ..core.measure.latency import compare_latency
from ..core.measure.timing import timing_warnings
from ..core.task import Task, call_model
from . import rules
from .cost import CostModel, fit_curve, materialize
from .space import Policy
from .trials import Evaluator


def measure_ratio(cm: CostModel, model: nn.Module, policy: Policy, task: Task, batch_size: int = 256,
                  threads: int | None = 1, repeats: int = 9, blocks: int = 3) -> dict[str, Any]:
    """The policy's latency / the unpruned model's, measured end to end (see module doc)."""
    inputs, example1 = task.example_inputs(batch_size=batch_size), task.example_inputs(batch_size=1)
    model = model.eval()
    pruned = materialize(model, cm.space, policy, example1)
    if policy.keep_float is not None and cm.int8 is not None:  # as shipped: the ORT int8 graph
        from .int8_cost import granularity_of, ort_int8
        from .policy import int8_exclude

        # float: keep_float + shared layers + both factors of a factorized one (as the recipe)
        pruned = ort_int8(pruned, example1, task, granularity_of(policy), tuple(int8_exclude(policy, cm.space)), threads)
    ratios, warnings, bases = [], [], []
    for _ in range(blocks):
        res = compare_latency({"base": lambda: call_model(model, inputs),
                               "pruned": lambda: call_model(pruned, inputs)},
                              warmup=2, repeats=repeats, threads=threads)
        w = timing_warnings(res)
        basis = "p10_ms" if w else "median_ms"
        ratios.append(res["pruned"][basis] / res["base"][basis])
        warnings += [x for x in w if x not in warnings]
        bases.append(basis.removesuffix("_ms"))
    return {"measured_ratio": float(statistics.median(ratios)), "block_ratios": [float(r) for r in ratios],
            "noise": float((max(ratios) - min(ratios)) / 2), "basis": "/".join(sorted(set(bases))),
            "warnings": warnings}


def recalibrate(cm: CostModel, policy: Policy, measured: float) -> None:
    """Add an end-to-end measurement of ``policy`` to the table's calibration and refit (the
    int8 table's, for a policy with an int8 stage)."""
    target, table = cm, cm.table_ratio
    if policy.keep_float is not None and cm.int8 is not None:
        target, table = cm.int8, cm.int8_table_ratio  # the ratio cost() prices the policy at
    target.calibration.append({"keep": policy.to_dict()["keep"], "table_ratio": float(table(policy)),
                               "measured_ratio": float(measured), "source": "check"})
    fit_curve(target)


def enforce(cm: CostModel, model: nn.Module, trials: list[dict[str, Any]], task: Task, ratio: float,
            tolerance: float = 0.02, most: int = 5, batch_size: int = 256, threads: int | None = 1,
            repeats: int = 9, blocks: int = 3, log: Callable[[str], None] = print,
            measure: Callable[[Policy], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The best trial whose measured latency ratio holds ``ratio`` (x (1 + tolerance)).

    Returns {chosen: the trial record or None, checks: [every timing made], passed_over: [trials
    the recalibrated table priced over budget]}. ``cm``'s calibration gains every check.
    ``measure(policy) -> measure_ratio's dict`` replaces the timing (tests)."""
    if measure is None:
        def measure(p: Policy) -> dict[str, Any]:
            return measure_ratio(cm, model, p, task, batch_size, threads, repeats, blocks)

    order = sorted((t for t in trials if t.get("feasible", True) and not t.get("cached")),
                   key=lambda t: (-t["val"], t.get("latency_ratio", 0.0), t["index"]))
    limit = ratio * (1.0 + tolerance)
    checks: list[dict[str, Any]] = []
    passed_over: list[dict[str, Any]] = []
    seen: set[str] = set()
    for rec in order:
        if len(checks) >= most:
            break
        p = Policy.from_dict(rec["policy"])
        if p.key() in seen:
            continue
        seen.add(p.key())
        predicted = cm.cost(p)["latency_ratio"]
        if checks and predicted > limit:  # the table, recalibrated by the checks so far, says over
            passed_over.append({"index": rec["index"], "val": rec["val"], "predicted_ratio": predicted})
            continue
        row = dict(measure(p))
        held = row["measured_ratio"] <= limit
        row.update({"index": rec["index"], "val": rec["val"], "predicted_ratio": predicted,
                    "rel_error": (predicted - row["measured_ratio"]) / row["measured_ratio"], "held": held,
                    "budget": ratio, "margin_pct": 100 * (ratio - row["measured_ratio"]) / ratio})
        checks.append(row)
        log(f"budget check: trial {rec['index']} (val {rec['val']:.4f}) predicted {predicted:.3f}x, measured "
            f"{row['measured_ratio']:.3f}x ± {row['noise']:.3f} -> {'holds' if held else 'over'} the {ratio:.3f}x budget"
            + (f" [{'; '.join(row['warnings'])}]" if row["warnings"] else ""))
        recalibrate(cm, p, row["measured_ratio"])
        if held:
            return {"chosen": rec, "checks": checks, "passed_over": passed_over, "tolerance": tolerance}
    return {"chosen": None, "checks": checks, "passed_over": passed_over, "tolerance": tolerance}


def hold(ev: Evaluator, trials: list[dict[str, Any]], tolerance: float = 0.02, most: int = 5,
         batch_size: int = 256, threads: int | None = 1, rounds: int = 2,
         log: Callable[[str], None] = print, measure: Callable[[Policy], dict[str, Any]] | None = None) -> dict[str, Any]:
    """``enforce`` over a search's trials; when no timed trial holds the budget, one more policy,
    the best trial's refitted to the recalibrated table (its proportions kept, scaled to the
    widest within budget: ``rules.fit_budget``), is evaluated and timed (``rounds`` times at
    most). Returns enforce's dict plus ``extra``: the records of those added evaluations."""
    kw = {"tolerance": tolerance, "batch_size": batch_size, "threads": threads, "log": log, "measure": measure}
    result = enforce(ev.cost_model, ev.model, trials, ev.task, ev.budget.ratio, most=most, **kw)
    extra: list[dict[str, Any]] = []
    top = max((t for t in trials if t.get("feasible", True)), key=lambda t: (t["val"], -t["index"]), default=None)
    while result["chosen"] is None and top is not None and len(extra) < rounds:
        log(f"budget check: no timed trial holds the budget; trial {top['index']} refitted to the recalibrated table")
        pol, ok = rules.fit_budget(ev.space.clip(Policy.from_dict(top["policy"])), ev.space, ev.cost, ev.budget.ratio)
        if not ok:
            break
        rec = dict(ev(pol, maker=f"{top.get('maker', '')}-refit", fitted=True), index=len(trials) + len(extra))
        extra.append(rec)
        again = enforce(ev.cost_model, ev.model, [dict(rec, cached=False)], ev.task, ev.budget.ratio, most=1, **kw)
        result = {**again, "checks": result["checks"] + again["checks"],
                  "passed_over": result["passed_over"] + again["passed_over"]}
    return {**result, "extra": extra}

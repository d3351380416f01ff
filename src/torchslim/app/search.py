"""``torchslim search RECIPE``: find the best compression policy under a budget, write it as a recipe.

A search recipe is an ordinary recipe (task, model, seed, ``train`` for the baseline, measure)
plus a ``search`` block; its ``stages`` are ignored (the search writes them)::

    search:
      budget: {latency: 0.5x}        # or {macs: 0.3x}, {size: 8MB} (non-zero fp32 bytes)
      method: tpe                    # uniform | sensitivity | rules | random | tpe | nsga2 | rl
      trials: 20                     # evaluated policies
      finetune: {epochs: 1}          # per-policy recovery (TrainConfig fields)
      accuracy_min: 0.9              # optional: exit code 1 when the best is below it
      int8: false                    # int8-or-float per layer + granularity, on ORT's int8 kernels
      progress: null                 # the bar over trials: null = auto (in a terminal), true, false
      space: cnn                     # or transformer: heads / FFN units / layer drop / int8 per
                                     # group of a BERT-style encoder (app/search_transformer.py)

The block is ``SearchSpec``, a config on the one contract (``torchslim.core.config_base``): unknown
keys refused, every number bounded on both sides, errors naming ``search.<field>``.

Outputs in ``out``: ``baseline.safetensors`` (the trained model every policy starts from),
``cost.json`` (the measured latency table), ``trials.json`` (every evaluated policy: metrics,
costs, the maker; each a point of the Pareto plot), ``pareto.json``, ``best_recipe.yaml`` (the
best policy as a recipe: ``torchslim run best_recipe.yaml`` reproduces its metric) and
``search.json`` (summary). Under a latency budget the answer is *measured*: the best trials are
timed end to end, interleaved with the baseline, until one holds the budget (within
``tolerance``; ``search.verify``), the table recalibrated by each check; ``search.json`` says
which holds and by how much, and ``best_recipe.yaml`` is always a policy that held. ``trials.jsonl``
logs every evaluated policy as it finishes: ``resume=True`` reuses the baseline, the table and that
log (so a killed rules or RL search replays its finished trials from the log instead of re-running
them), and an Optuna study continues from its storage (SQLite by default).
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
from ..search import cost as cost_mod
from ..search import int8_cost, optuna_search, rules, verify
from ..search.space import Policy, build_space
from ..search.trials import Evaluator, TrialBar, best, pareto
from .search_spec import (
    MANY,
    METHODS,
    SearchSpec,
    TableSpec,
    base_recipe,
    baseline,
    finetune_fields,
    parse_budget,
    read_search_recipe,
)

__all__ = ["METHODS", "OUTPUTS", "SearchSpec", "TableSpec", "finetune_fields", "parse_budget", "read_search_recipe", "run_search",
           "write_outputs"]

OUTPUTS = ("baseline.safetensors", "cost.json", "trials.json", "pareto.json", "best_recipe.yaml", "search.json",
           "search.db", "search.journal", "search.journal.lock", "trials.jsonl", "sensitivity.json",
           "report.html", "search-pareto.png")
def _cost_model(model, space, task, recipe, spec: SearchSpec, out: Path, resume: bool, kind: str, log):
    measure = recipe.get("measure") or {}
    batch, threads = int(measure.get("batch_size", 256)), measure.get("threads", 1)
    cm = cost_mod.build_cost_model(model, space, task, batch_size=batch, threads=threads, latency=False)
    path = out / "cost.json"
    if kind != "latency":
        return cm
    if resume and path.exists():
        saved = json.loads(path.read_text())
        cm.tables, cm.curve, cm.calibration = saved["tables"], saved["curve"], saved["calibration"]
        cm.base_ms, cm.notes = saved["base_ms"], saved["notes"]
        if "int8" in saved:
            cm.int8 = int8_cost.Int8Table.from_dict(saved["int8"])
        log(f"latency table: reusing {path}")
        return cm
    t0 = time.perf_counter()
    cm = cost_mod.build_cost_model(model, space, task, batch_size=batch, threads=threads,
                                   grid=spec.table.grid, repeats=spec.table.repeats)
    log(f"latency table: {len(cm.tables)} layers measured in {time.perf_counter() - t0:.1f}s "
        f"(batch {batch}, {threads} thread(s)); {len(cm.notes)} timing warning(s)")
    if space.int8 and space.int8_backend == "onnxruntime":  # bit widths priced by ORT's int8 kernels
        t0 = time.perf_counter()
        cm.int8 = int8_cost.build_int8_table(cm, model, task, batch_size=batch, threads=threads,
                                             repeats=spec.table.repeats)
        log(f"int8 table (ONNX Runtime fp32 / int8 per channel / per tensor): {time.perf_counter() - t0:.1f}s; "
            f"calibrated at {len(cm.int8.calibration)} uniform int8 models")
    atomic_write_text(path, json.dumps(cm.to_dict(), indent=1))
    return cm


def make_policies(ev: Evaluator, spec: SearchSpec, out: Path, log) -> list[dict[str, Any]]:
    """Run the chosen policy maker; every evaluated policy's record."""
    m, ratio = spec.method, ev.budget.ratio
    if m == "uniform":
        ev(rules.uniform(ev.space, ev.cost, ratio)[0], maker=m, fitted=True)
    elif m == "sensitivity":
        cached = out / "sensitivity.json"
        if cached.exists():  # only a resumed search finds it (a fresh one deletes it)
            sens = json.loads(cached.read_text())
        else:
            sens = rules.group_sensitivity(ev.model, ev.task, ev.space, spec.sensitivity_sparsity)
            atomic_write_text(cached, json.dumps(sens))
        log("sensitivity per group: " + ", ".join(f"{k} {v:.3f}" for k, v in sens.items()))
        ev(rules.sensitivity_rule(sens, ev.space, ev.cost, ratio)[0], maker=m, fitted=True)
    elif m == "rules":
        ev(rules.user_rules(spec.rules, ev.space, ev.cost, ratio)[0], maker=m, fitted=True)
    elif m == "rl":
        from ..search import agent

        agent.run(ev, spec.trials, seed=spec.seed)
    else:
        default = spec.storage or (None if spec.workers == 1 else f"journal:{out / 'search.journal'}")
        storage = optuna_search.storage_for(default, str(out / "search.db"))
        name = spec.study or f"torchslim-{m}-{spec.seed}"
        stale = optuna_search.fail_stale(optuna_search.study(m, storage, name, spec.seed, spec.trials))
        if stale:
            log(f"resume: {stale} trial(s) an interrupted run left running are marked failed and re-run")
        if spec.workers > 1:
            return _parallel(ev, spec, m, storage if isinstance(storage, str) else default, name, log)
        return optuna_search.run(ev, m, spec.trials, storage, name, seed=spec.seed)
    return ev.trials


def _worker(args: tuple) -> int:
    """One worker process of a parallel Optuna search (rebuilds the evaluator from the files)."""
    path, out, worker = args
    torch.set_num_threads(1)
    ev, spec = _evaluator(Path(path), Path(out), True, lambda s: print(f"[worker {worker}] {s}", flush=True))
    default = spec.storage or f"journal:{Path(out) / 'search.journal'}"
    storage = optuna_search.storage_for(default, str(Path(out) / "search.db"))
    name = spec.study or f"torchslim-{spec.method}-{spec.seed}"
    optuna_search.run(ev, spec.method, spec.trials, storage, name, seed=spec.seed + 1000 * worker)
    return worker


def _parallel(ev: Evaluator, spec: SearchSpec, method: str, storage_spec: str, name: str, log) -> list[dict[str, Any]]:
    import multiprocessing as mp

    st = optuna_search.study(method, optuna_search.storage_for(storage_spec, ""), name, spec.seed, spec.trials)
    shown: set[int] = set()

    def show() -> None:  # the workers draw no bar: this process shows their finished trials on its own
        for rec in optuna_search.records(st):
            if rec["optuna_trial"] not in shown and len(shown) < spec.trials:
                shown.add(rec["optuna_trial"])
                ev.bar.add(rec)

    with mp.get_context("spawn").Pool(spec.workers) as pool:
        job = pool.map_async(_worker, [(str(_SOURCE[0]), str(_SOURCE[1]), w) for w in range(spec.workers)])
        while not job.ready():
            job.wait(2.0)
            if ev.bar is not None and ev.bar.on:
                show()
        job.get()  # a worker's error is raised here
    if ev.bar is not None and ev.bar.on:
        show()
    st = optuna_search.study(method, optuna_search.storage_for(storage_spec, ""), name, spec.seed, spec.trials)
    return optuna_search.records(st)


_SOURCE: list[Path] = []


def _evaluator(path: Path, out: Path, resume: bool, log) -> tuple[Evaluator, SearchSpec]:
    recipe, spec = read_search_recipe(path)
    task, model, weights = baseline(recipe, out, resume, log)
    space = build_space(model, task, keep_min=spec.keep_min, sparsities=tuple(spec.sparsities),
                        int8=spec.int8, step=spec.step, int8_backend=spec.int8_backend,
                        **space_extras(spec))
    budget = parse_budget(spec.budget)
    probe = cost_mod.build_cost_model(model, space, task, latency=False)
    if budget.kind == "nonzeros":
        base_bytes = 4 * probe.counts(model, Policy(), task.example_inputs(batch_size=1))["nonzeros"]
        budget = parse_budget(spec.budget, base_bytes)
    cm = _cost_model(model, space, task, recipe, spec, out, resume, budget.kind, log)
    return Evaluator(model, task, space, cm, budget, base_recipe(recipe, weights), finetune_fields(spec.finetune), log=log,
                     journal=out / "trials.jsonl"), spec


def space_extras(spec: SearchSpec) -> dict[str, Any]:
    """The CNN space's low-rank and share-bits dimensions, passed only when asked for (so an older
    ``build_space`` without them still serves every other search)."""
    out: dict[str, Any] = {}
    if spec.ranks:
        out["ranks"] = tuple(float(r) for r in spec.ranks)
    if spec.share_bits:
        out["share_bits"] = tuple(int(b) for b in spec.share_bits)
    return out


def run_search(path: str | Path, out_dir: str | Path | None = None, resume: bool = False, log=print) -> int:
    """The ``torchslim search`` entry: 0 when a policy within budget (and accuracy_min) was found,
    1 when none was; bad input raises a one-line ConfigError/RecipeError (exit code 2)."""
    t0 = time.perf_counter()
    recipe, spec = read_search_recipe(path)  # bad input refused before anything is touched
    out = Path(out_dir or "out-search")
    out.mkdir(parents=True, exist_ok=True)
    _SOURCE[:] = [Path(path).resolve(), out.resolve()]
    if not resume:  # a fresh search: what an earlier one wrote here would be continued otherwise
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    if spec.space == "transformer":
        from .search_transformer import run_transformer_search

        top = run_transformer_search(recipe, spec, out, resume, t0, log).get("best")
        return 0 if top is not None and (spec.accuracy_min is None or top["val"] >= spec.accuracy_min) else 1
    ev, spec = _evaluator(Path(path), out, resume, log)
    log(f"search: {spec.method}, {spec.trials} trial(s), budget {ev.budget.kind} <= {ev.budget.ratio:.3f}x, "
        f"{len(ev.space.groups)} channel groups")
    ev.bar = TrialBar(spec.trials if spec.method in MANY else 1, setting=spec.progress)
    try:
        trials = make_policies(ev, spec, out, log)
    finally:
        ev.bar.close()
        ev.bar = None  # the budget checks' refits after it are not trials of the bar
    summary = write_outputs(ev, spec, trials, out, time.perf_counter() - t0, log)
    top = summary.get("best")
    ok = top is not None and (spec.accuracy_min is None or top["val"] >= spec.accuracy_min)
    return 0 if ok else 1


def hold_budget(ev: Evaluator, spec: SearchSpec, trials: list[dict[str, Any]], out: Path, log) -> dict[str, Any]:
    """Under a latency budget: the best trial that holds it as measured (``verify.hold``); the
    table, recalibrated by the checks, is saved for a resumed search."""
    measure = ev.base_recipe.get("measure") or {}
    result = verify.hold(ev, trials, tolerance=spec.tolerance, most=spec.checks,
                         batch_size=int(measure.get("batch_size", 256)), threads=measure.get("threads", 1), log=log)
    atomic_write_text(out / "cost.json", json.dumps(ev.cost_model.to_dict(), indent=1))
    return result


def write_outputs(ev: Evaluator, spec: SearchSpec, trials: list[dict[str, Any]], out: Path,
                  seconds: float, log) -> dict[str, Any]:
    key = {"latency": "latency_ratio", "nonzeros": "size_ratio"}.get(ev.budget.kind, "macs_ratio")
    top = best(trials)
    held = None
    if top is not None and ev.budget.kind == "latency":
        held = hold_budget(ev, spec, trials, out, log)
        trials = trials + held["extra"]  # + the recalibrated fallback, when one was needed
        top = held["chosen"]
    summary: dict[str, Any] = {"method": spec.method, "budget": {"kind": ev.budget.kind, "ratio": ev.budget.ratio},
                               "trials": len(trials), "seconds": round(seconds, 1), "best": top,
                               "resumed_trials": sum(bool(t.get("resumed")) for t in trials),
                               "machine": machine_facts(torch.get_num_threads()),
                               "space": ev.space.describe()}
    if held is not None:
        checks = held["checks"]
        summary["latency_check"] = checks[-1] if top is not None else None
        summary["latency_checks"] = checks
        summary["passed_over"] = held["passed_over"]
        summary["budget_held"] = top is not None
        if top is not None:
            summary["measured_latency_ratio"] = checks[-1]["measured_ratio"]
            summary["budget_margin_pct"] = checks[-1]["margin_pct"]  # > 0: under the budget by that share
    atomic_write_text(out / "trials.json", json.dumps(trials, indent=1))
    atomic_write_text(out / "pareto.json", json.dumps(pareto(trials, key), indent=1))
    (out / "best_recipe.yaml").unlink(missing_ok=True)  # only a policy that holds the budget is written
    if top is not None:
        recipe = dict(ev.recipe(Policy.from_dict(top["policy"])), name=f"best policy of a {spec.method} search")
        atomic_write_text(out / "best_recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
        measured = (f", measured {summary['measured_latency_ratio']:.3f}x ({summary['budget_margin_pct']:+.1f}% "
                    f"under the budget)") if held is not None else ""
        log(f"best: val {top['val']:.4f} test {top['test']:.4f} at {top.get(key, float('nan')):.3f}x {key[:-6]}"
            f"{measured} -> {out / 'best_recipe.yaml'}")
    else:
        log("no policy within the budget was found" + (" as measured" if held is not None else ""))
    atomic_write_text(out / "search.json", json.dumps(summary, indent=1, default=str))
    try:  # every trial as a point of the report's Pareto plot (matplotlib: the report extra)
        from .report.search_report import write_search_report

        log(f"report: {write_search_report(summary, out)}")
    except ImportError:
        log("report: not written (needs matplotlib: pip install 'torchslim[report]'); torchslim report search.json later")
    return summary

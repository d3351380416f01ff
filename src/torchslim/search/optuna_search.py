"""Optuna policy makers: TPE and random search (single objective: val metric at the budget) and
NSGA-II (two objectives: val metric up, budgeted cost down; its Pareto front is the answer).

Storage is SQLite by default (embedded, no server: ``sqlite:///out/search.db``), so a search
that is stopped resumes where it was (``load_if_exists``; finished trials are not re-run), and
many workers can share one study: ``journal:PATH`` is Optuna's JournalStorage on a file (a shared
file system, lock-file based), any SQLAlchemy URL (``postgresql://...``) a server. Trials are capped
by their storage-assigned number (see ``run``), so concurrent workers evaluate exactly the study's
trial count: no trial is lost or duplicated; trials a killed process left running are marked
failed on resume (``fail_stale``) and replaced.
"""

from __future__ import annotations

from typing import Any

import optuna

from ..core.errors import check
from .space import GRANULARITIES, Policy
from .trials import Evaluator

METHODS = ("tpe", "random", "nsga2")


def storage_for(spec: str | None, default_path: str) -> Any:
    """'journal:PATH' -> JournalStorage on a file; a URL -> as is; None -> SQLite at default_path."""
    if spec is None:
        return f"sqlite:///{default_path}"
    if spec.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(spec.removeprefix("journal:")))
    check("://" in spec, "search.storage", f"use 'journal:PATH' or a database URL (sqlite:///f.db), got {spec!r}")
    return spec


def _sampler(method: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    if method == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)),
                                          multivariate=True)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, n_trials // 3)))


def suggest(trial: optuna.Trial, ev: Evaluator) -> Policy:
    space = ev.space
    keep = {g.root: trial.suggest_float(f"keep:{g.root}", space.keep_min, 1.0) for g in space.groups}
    sparsity = {}
    if space.sparsities:
        for layer in space.layers:
            if layer != space.classifier:
                sparsity[layer] = trial.suggest_categorical(f"sparsity:{layer}", list(space.sparsities))
    keep_float, granularity = None, None
    if space.int8:
        keep_float = tuple(n for n in space.layers if trial.suggest_categorical(f"float:{n}", [False, True]))
        granularity = trial.suggest_categorical("int8:granularity", list(GRANULARITIES))
    # new dimensions under new names, asked after the old ones: a resumed study's parameters keep
    # their names; 1.0 = not factorized, 0 = not shared (clip then applies the constraints)
    rank, share = {}, {}
    if space.ranks:
        for layer in space.shapes:  # the factorizable layers (never the classifier)
            rank[layer] = trial.suggest_categorical(f"rank:{layer}", [1.0, *(float(r) for r in space.ranks)])
    if space.share_bits:
        for layer in space.layers:
            share[layer] = trial.suggest_categorical(f"share:{layer}", [0, *(int(b) for b in space.share_bits)])
    return Policy(keep, sparsity, keep_float, granularity, {k: v for k, v in rank.items() if v < 1.0},
                  {k: v for k, v in share.items() if v > 0})


def study(method: str, storage: Any, name: str, seed: int, n_trials: int) -> optuna.Study:
    check(method in METHODS, "search.method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    directions = ["maximize", "minimize"] if method == "nsga2" else ["maximize"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage, sampler=_sampler(method, seed, n_trials),
                               directions=directions, load_if_exists=True)


def run(ev: Evaluator, method: str, n_trials: int, storage: Any, name: str, seed: int = 0) -> list[dict[str, Any]]:
    """Run (or continue) the study until it holds ``n_trials`` finished trials; every finished
    trial's record (from any worker) is returned, in trial order."""
    st = study(method, storage, name, seed, n_trials)

    def objective(trial: optuna.Trial):
        # Trial numbers are handed out atomically by the storage, so capping by number (not by
        # counting finished trials, which lets concurrent workers overshoot) evaluates each of the
        # first n_trials exactly once; a failed trial's number is replaced by one more.
        failed = sum(t.state == optuna.trial.TrialState.FAIL for t in st.get_trials(deepcopy=False))
        if trial.number >= n_trials + failed:
            st.stop()
            raise optuna.TrialPruned("the study already holds its trials")
        raw = suggest(trial, ev)
        if method == "nsga2":  # explore cost freely; a trial over budget is kept, marked infeasible
            p = ev.space.clip(raw)
            rec = ev(p, maker=method, fitted=True, feasible=ev.cost(p) <= ev.budget.ratio + 1e-9)
        else:
            rec = ev(raw, maker=method)
        rec = dict(rec, optuna_trial=trial.number)
        trial.set_user_attr("record", rec)
        return (rec["val"], ev.cost(Policy.from_dict(rec["policy"]))) if method == "nsga2" else rec["val"]

    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials)
    if ev.bar is not None:  # a resumed study: the trials it holds are steps of the bar already
        for rec in records(st)[:n_trials]:
            ev.bar.add(rec)
    if done < n_trials:
        if st.trials:  # resumed: a sampler seeded as before would draw the finished policies again
            st.sampler = _sampler(method, seed + len(st.trials), n_trials)
        st.optimize(objective, n_trials=n_trials - done, catch=())
    return records(st)


def fail_stale(st: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed process as FAIL (call when no worker is running), so
    a resumed search replaces them instead of losing them; returns how many."""
    stale = [t for t in st.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        st._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


def records(st: optuna.Study) -> list[dict[str, Any]]:
    out = []
    for t in st.trials:
        rec = t.user_attrs.get("record")
        if t.state == optuna.trial.TrialState.COMPLETE and rec is not None:
            out.append(dict(rec, optuna_trial=t.number))
    out.sort(key=lambda r: r["optuna_trial"])
    for i, r in enumerate(out):
        r["index"] = i
    return out

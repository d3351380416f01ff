"""One interface for every policy maker: ``Evaluator(raw policy) -> trial record``.

The evaluator fits the raw proposal to the budget (``rules.fit_budget``), writes it as recipe
stages (``policy.to_stages``), runs them on the trained model the way ``torchslim run`` does
(``policy.evaluate``: structured pruning, sparsity, a short fine-tune) and returns a record:
the policy, val and test metric, predicted latency ratio, exact MACs ratio, parameters,
non-zeros and stored weight bytes, seconds. The objective is the *val* metric; test is reported, never optimized.

With ``journal`` (a file of JSON lines, one per evaluated policy, keyed by the policy) the
evaluator resumes: a policy the log already holds is answered from it (``resumed: true``) instead
of being pruned and fine-tuned again. Every maker is deterministic given its seed and the metrics
it is fed, so a killed rules or RL search that is started again replays its finished trials from
the log and carries on where it stopped (Optuna resumes from its own storage as well).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import progress
from ..core.task import Task
from . import policy as policy_mod
from .cost import CostModel
from .rules import Budget, fit_budget
from .space import Policy, SearchSpace


@dataclass
class Evaluator:
    model: nn.Module
    task: Task
    space: SearchSpace
    cost_model: CostModel
    budget: Budget
    base_recipe: dict[str, Any]          # task, model (+weights), seed, measure: no stages
    finetune: dict[str, Any] | None      # TrainConfig fields of the per-policy fine-tune
    log: Callable[[str], None] = print
    journal: str | Path | None = None    # the trials log a resumed search reads (see module doc)
    bar: TrialBar | None = None          # the search's progress bar: every trial record is shown on it
    trials: list[dict[str, Any]] = field(default_factory=list)
    _cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    _done: dict[str, dict[str, Any]] = field(default_factory=dict)
    _base_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.journal is not None:
            self._done = read_journal(self.journal)

    def cost(self, p: Policy) -> float:
        """The budgeted quantity of p as a share of the unpruned model's. The ``nonzeros`` kind
        (a size budget) compares stored weight bytes (``CostModel.counts``: fp32 4 bytes per
        non-zero, int8 1, shared layers their index bits + codebook): for a float policy without
        sharing that is exactly the non-zeros ratio it compared before (4 * nz / 4 * base nz)."""
        if self.budget.kind == "latency":
            return self.cost_model.cost(p)["latency_ratio"]
        if self.budget.kind == "macs":
            return self.cost_model.cost(p)["macs_ratio"]
        return self.cost_model.counts(self.model, p, self.task.example_inputs(batch_size=1))["bytes"] / self.base_bytes()

    def base_bytes(self) -> int:
        """The unpruned float model's stored weight bytes (the size budget's denominator)."""
        if self._base_bytes is None:
            self._base_bytes = self.cost_model.counts(self.model, Policy(), self.task.example_inputs(batch_size=1))["bytes"]
        return self._base_bytes

    def fit(self, raw: Policy) -> tuple[Policy, bool]:
        return fit_budget(self.space.clip(raw), self.space, self.cost, self.budget.ratio)

    def recipe(self, p: Policy) -> dict[str, Any]:
        return policy_mod.to_recipe(p, self.space, self.base_recipe, self.finetune)

    def __call__(self, raw: Policy, maker: str = "", fitted: bool = False, feasible: bool | None = None) -> dict[str, Any]:
        """The record of ``raw`` (fitted to the budget unless ``fitted``); ``feasible`` overrides
        the record's flag (NSGA-II explores past the budget and marks what lies beyond it)."""
        p, ok = (raw, True) if fitted else self.fit(raw)
        told = {} if feasible is None else {"feasible": feasible}
        p = self.space.canonical(p)
        key = p.key()
        if key in self._cache:  # same policy again: same numbers (the run is deterministic)
            return self._record(dict(self._cache[key], maker=maker, cached=True, index=len(self.trials), **told))
        if key in self._done:  # evaluated before the search was interrupted: not run again
            rec = dict(self._done.pop(key), maker=maker, cached=False, resumed=True, index=len(self.trials), **told)
            self._cache[key] = rec
            self.log(f"trial {rec['index']:3d} [{maker}] val {rec['val']:.4f} (from the trials log)")
            return self._record(rec)
        t0 = time.perf_counter()
        with _own_rng():
            _, metrics = policy_mod.evaluate(self.model, self.recipe(p), self.task)
        c = self.cost_model.cost(p)
        counts = self.cost_model.counts(self.model, p, self.task.example_inputs(batch_size=1))
        rec = {"index": len(self.trials), "maker": maker, "policy": p.to_dict(), "feasible": ok if feasible is None else feasible,
               "val": metrics["val"], "test": metrics["test"], **c, **counts,
               "size_ratio": counts["bytes"] / self.base_bytes(),  # what a size budget bounds
               "seconds": round(time.perf_counter() - t0, 3), "cached": False}
        self._cache[key] = rec
        if self.journal is not None:
            append_journal(self.journal, key, rec)
        self.log(f"trial {rec['index']:3d} [{maker}] val {rec['val']:.4f} test {rec['test']:.4f} "
                 f"latency {c.get('latency_ratio', float('nan')):.3f}x macs {c['macs_ratio']:.3f}x "
                 f"({rec['seconds']:.1f}s)")
        return self._record(rec)

    def _record(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.trials.append(rec)
        if self.bar is not None:
            self.bar.add(rec)
        return rec


class TrialBar:
    """The bar over a search's trials (``torchslim.core.progress``; ``setting`` None = its auto
    rule, so worker processes of a parallel search draw none): one step per trial record, its
    text the trial count, the best val metric so far (``best``: feasible trials only) and how
    many trials are within the budget."""

    def __init__(self, total: int, setting: bool | None = None):
        self.total, self.seen = total, []
        self.bar = progress.bar("search trials", total, setting=setting)
        self.on = isinstance(self.bar, progress.Bar)

    def add(self, rec: dict[str, Any]) -> None:
        self.seen.append(rec)
        top, held = best(self.seen), sum(bool(r.get("feasible", True)) for r in self.seen)
        self.bar.advance(1, trial=f"{len(self.seen)}/{self.total}",
                         **{"best val": "none" if top is None else f"{top['val']:.4f}",
                            "budget held": f"{held}/{len(self.seen)}"})

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> TrialBar:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _own_rng():
    """An evaluation reseeds the global RNGs (each stage is seeded, as the runner does); the
    maker's own random stream (the agent's exploration noise, its replay sampling) is restored
    after it, so the maker draws the same numbers whether a trial ran or came from the log."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def read_journal(path: str | Path) -> dict[str, dict[str, Any]]:
    """policy key -> record, from a trials log; a torn last line (a kill mid-write) is skipped."""
    out: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
            out.setdefault(row["key"], row["record"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def append_journal(path: str | Path, key: str, rec: dict[str, Any]) -> None:
    """One line per finished evaluation, appended and synced. Appended rather than rewritten
    atomically (``atomic_write``): the log only grows, a reader skips a torn last line, and
    worker processes on one output folder may append to it concurrently (O_APPEND)."""
    line = json.dumps({"key": key, "record": rec}, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest val metric among feasible trials (ties: the cheaper, then the earlier)."""
    ok = [t for t in trials if t.get("feasible", True)]
    return max(ok, key=lambda t: (t["val"], -t.get("latency_ratio", t["macs_ratio"]), -t["index"]), default=None)


def pareto(trials: list[dict[str, Any]], cost_key: str = "latency_ratio") -> list[dict[str, Any]]:
    """Trials no other trial beats on both val metric (higher) and cost (lower)."""
    pts = [t for t in trials if cost_key in t and not t.get("cached")]
    front = [t for t in pts if not any((o["val"] >= t["val"] and o[cost_key] <= t[cost_key]) and
                                       (o["val"] > t["val"] or o[cost_key] < t[cost_key]) for o in pts)]
    return sorted(front, key=lambda t: t[cost_key])

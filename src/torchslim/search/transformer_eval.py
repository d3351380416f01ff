"""Evaluating transformer plans (``transformer_space``): each plan built through the runner's stage
code, scored on the val split and timed end to end against the fp32 model; Optuna over them.

Cost is measured, not modelled: a plan's latency ratio is its ONNX Runtime (or PyTorch) model
timed interleaved with the fp32 PyTorch model in the same run (``compare_latency``), once per
distinct plan; MACs per token are exact (``macs_per_token``); size is the plan's file bytes
(ONNX bytes for an int8 plan, the state dict otherwise) over the fp32 model's.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from ..core.errors import check
from ..core.task import Task, call_model
from .transformer_space import (
    TransformerPolicy,
    TransformerSpace,
    macs_per_token,
    suggest,
    to_recipe,
    trial_params,
)

#: budget kind -> the record field it bounds (ratios to the fp32 model)
BUDGET_KEYS = {"latency": "latency_ratio", "macs": "macs_ratio", "size": "size_ratio"}


def at_threads(model: nn.Module, threads: int) -> nn.Module:
    """An ONNX Runtime model rebuilt with ``threads`` intra-op threads; a torch model as is
    (``compare_latency(threads=...)`` sets torch's)."""
    from ..quantization.backends import OrtModel

    return OrtModel(model.onnx_bytes, model.input_names, threads, model.info) if isinstance(model, OrtModel) else model


def file_bytes(model: nn.Module) -> int:
    from ..core.measure import state_dict_bytes

    return int(getattr(model, "file_bytes", 0) or state_dict_bytes(model))


class PlanEvaluator:
    """Applies a policy's recipe stages to ``model`` as the runner does, scores them on the val
    split and times the result at ``threads`` against the fp32 ``model`` (interleaved, same run).
    One evaluation per distinct plan (``cache``); ``keep`` models of the most faithful plans
    within the budget (plus ``margin``: the final measurement on more data decides) are kept.
    ``kind``: what ``budget`` bounds (BUDGET_KEYS); the latency is measured whatever the kind.
    ``finetune``: TrainConfig fields of a fine-tune after the pruning (None: none).
    Records carry ``val`` (the task's metric), and ``val_cosine`` / ``val_top10`` on a fidelity
    task (metric mean_cosine)."""

    def __init__(self, model: nn.Module, task: Task, space: TransformerSpace, base: dict[str, Any],
                 timing_batches: list[Any], budget: float = 0.33, threads: int = 1, repeats: int = 5,
                 keep: int = 3, margin: float = 0.1, log: Any = print, kind: str = "latency",
                 finetune: dict[str, Any] | None = None):
        check(0 < budget <= 1, "PlanEvaluator.budget", f"must be a ratio to the fp32 model in (0, 1], got {budget}")
        check(kind in BUDGET_KEYS, "PlanEvaluator.kind", f"unknown budget kind {kind!r}; use {', '.join(BUDGET_KEYS)}")
        self.model, self.task, self.space, self.base = model, task, space, base
        self.batches, self.budget, self.threads, self.repeats, self.keep = timing_batches, budget, threads, repeats, keep
        self.margin, self.kind, self.finetune = margin, kind, finetune
        self.cache: dict[str, dict[str, Any]] = {}
        self.models: dict[str, nn.Module] = {}
        self.records: list[dict[str, Any]] = []
        self.last_model: nn.Module | None = None  # the model of the latest plan built (not cached)
        self.base_bytes = file_bytes(model)
        self.log = log

    @property
    def key(self) -> str:
        return BUDGET_KEYS[self.kind]

    def runner(self, model: nn.Module):
        return lambda: [call_model(model, b) for b in self.batches]

    def recipe(self, policy: TransformerPolicy) -> dict[str, Any]:
        """The plan as a whole recipe (``torchslim run`` reproduces the plan's model)."""
        return to_recipe(policy, self.space, self.base, finetune=self.finetune)

    def build(self, policy: TransformerPolicy) -> nn.Module:
        from .policy import evaluate

        model, _ = evaluate(self.model, self.recipe(policy), self.task, splits=())
        return model.eval()

    def time(self, model: nn.Module, repeats: int | None = None) -> dict[str, Any]:
        """``model`` timed interleaved with the fp32 model: {ratio, plan_ms, fp32_ms, cpu_share}."""
        from ..core.measure import compare_latency

        lat = compare_latency({"fp32": self.runner(self.model), "plan": self.runner(at_threads(model, self.threads))},
                              warmup=1, repeats=repeats or self.repeats, threads=self.threads)
        return {"latency_ratio": lat["plan"]["median_ms"] / lat["fp32"]["median_ms"], "plan_ms": lat["plan"]["median_ms"],
                "fp32_ms": lat["fp32"]["median_ms"], "cpu_share": lat["fp32"]["load"].get("cpu_share")}

    def __call__(self, policy: TransformerPolicy, maker: str = "tpe") -> dict[str, Any]:
        key = policy.key()
        if key in self.cache:
            rec = dict(self.cache[key], maker=maker, cached=True)
            self.records.append(rec)
            return rec
        t0 = time.perf_counter()
        model = self.last_model = self.build(policy)
        built_s = time.perf_counter() - t0
        fid = self.task.evaluate_all(model, "val")
        timed = self.time(model)
        size = file_bytes(model)
        rec = {"policy": policy.to_dict(), "maker": maker, "val": float(fid[self.task.metric_name]), **timed,
               "macs_ratio": macs_per_token(policy, self.space) / macs_per_token(TransformerPolicy(), self.space),
               "size_ratio": size / self.base_bytes, "file_mb": size / 1e6, "build_seconds": built_s, "index": len(self.cache)}
        if self.task.metric_name == "mean_cosine":
            rec.update(val_cosine=rec["val"], val_top10=fid.get("top10_agreement"))
        rec["feasible"] = rec[self.key] <= self.budget
        rec["seconds"] = time.perf_counter() - t0
        self.cache[key] = rec
        self.records.append(rec)
        if rec[self.key] <= self.budget * (1 + self.margin):
            self.models[key] = model
            top = sorted((self.cache[k] for k in self.models), key=lambda r: -r["val"])[: self.keep]
            self.models = {plan_key(r): self.models[plan_key(r)] for r in top}
        self.log(f"  plan {rec['index']} ({maker}): val {rec['val']:.4f}, {rec['latency_ratio']:.3f}x fp32 latency, "
                 f"{rec['macs_ratio']:.3f}x MACs, {rec['file_mb']:.1f} MB, {rec['seconds']:.0f}s")
        return rec


def plan_key(rec: dict[str, Any]) -> str:
    """The cache key of a trial record's plan (``TransformerPolicy.key``: not its dict's JSON,
    which also holds a dropped layer's void choices)."""
    return TransformerPolicy.from_dict(rec["policy"]).key()


def _sampler(method: str, seed: int, n_trials: int):
    import optuna

    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # the budget reaches TPE as each trial's constraint (Trial.set_constraint: > 0 = infeasible)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)), multivariate=True)


def run_tpe(ev: PlanEvaluator, n_trials: int, seed: int = 0, enqueue: tuple[TransformerPolicy, ...] = (),
            timeout: float | None = None, storage: Any = None, study_name: str | None = None,
            method: str = "tpe") -> list[dict[str, Any]]:
    """Optuna TPE (or ``method="random"``) maximizing the val metric under ``ev``'s budget
    (``Trial.set_constraint``: a trial over budget counts as infeasible). ``enqueue`` plans are the
    first trials (counted in ``n_trials``); ``timeout`` (s) stops starting new trials. With a
    ``storage`` (an Optuna storage or URL) the study resumes: finished trials are not re-run (their
    records come back from the study) and only the rest of ``n_trials`` is evaluated. Returns one
    record per finished trial, in trial order."""
    import optuna

    from .optuna_search import fail_stale

    check(method in ("tpe", "random"), "run_tpe.method", f"use tpe or random, got {method!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(direction="maximize", sampler=_sampler(method, seed, n_trials),
                             storage=storage, study_name=study_name, load_if_exists=storage is not None)
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE and "record" in t.user_attrs]
    if done:  # a resumed study: a sampler seeded as before would draw the finished plans again
        st.sampler = _sampler(method, seed + len(st.trials), n_trials)
    fail_stale(st)  # a trial a killed run left running is failed, and replaced by a new one
    out = [dict(t.user_attrs["record"], trial=t.number, resumed=True) for t in done]
    for rec in out:  # the evaluator knows the finished plans (a later suggestion of one is a cache hit)
        ev.cache.setdefault(plan_key(rec), {k: v for k, v in rec.items() if k not in ("trial", "resumed")})
    if not done:
        for p in enqueue:
            st.enqueue_trial(trial_params(p, ev.space))

    def objective(trial: optuna.Trial) -> float:
        rec = ev(suggest(trial, ev.space), maker="enqueued" if trial.number < len(enqueue) else method)
        trial.set_user_attr(ev.key, rec[ev.key])
        trial.set_constraint("budget", rec[ev.key] - ev.budget)
        trial.set_user_attr("record", {k: v for k, v in rec.items() if k != "cached"})
        out.append(dict(rec, trial=trial.number))
        return rec["val"]

    left = n_trials - len(done)
    if left > 0:
        st.optimize(objective, n_trials=left, timeout=timeout)
    return out


def best_feasible(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best (val metric) record within the budget, or None."""
    ok = [r for r in records if r["feasible"]]
    return max(ok, key=lambda r: (r["val"], -r["latency_ratio"])) if ok else None


__all__ = ["BUDGET_KEYS", "PlanEvaluator", "at_threads", "best_feasible", "file_bytes", "run_tpe"]

"""B9: policy search at a 0.5x measured-latency budget on rescnn1d / MNIST-1D.

One trained rescnn1d (width 64); one latency table measured on this machine (PyTorch eager,
1 thread, batch 256; ``torchslim.search.cost``). Every arm proposes per-group keep ratios
(channel groups tied by the dependency graph), each proposal is fitted to <= 0.5x predicted
latency, pruned with physical removal, fine-tuned for the same short budget and scored on val;
the arm's answer is its best-by-val policy, reported on test. Arms: uniform, the sensitivity rule
(1 policy each: they are deterministic), random search, Optuna TPE and the AMC-style DDPG agent at
the same number of evaluated policies. Searched arms are repeated over seeds (the trained model,
the fine-tune seed and the table stay fixed). The winners' latency is then measured end to end,
interleaved with the baseline, against the table's prediction.

Run: ``python benchmarks/run.py B9`` (or ``python benchmarks/b9_search.py``); B9_TRIALS / B9_SEEDS
environment variables change the evaluation budget (defaults 12 and 3; --quick: 4 and 1).
The MiniLM part of B9 (<= 0.33x latency plan) and the 2-worker wall-time comparison are not
measured here (see docs/search.md).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ID = "B9"
TITLE = "Policy search at 0.5x latency predicted by the measured per-layer table (rescnn1d/MNIST-1D; the winners measured end to end in latency_checks): uniform, sensitivity, random, TPE, RL"
HEADLINE = ["gain_over_uniform_pt", "rl_minus_random_pt", "search_minutes", "lost_or_duplicated_trials", "two_worker_speedup",
            "latency_model_mean_abs_error"]


def _setup(quick: bool, log):
    from torchslim.export.weights import save_weights
    from torchslim.search import build_cost_model, build_space
    from torchslim.train import TrainConfig, fit
    from torchslim.utils import seed_everything
    from torchslim.zoo import build_model, build_task

    n = 4000 if quick else 10000
    task = build_task("mnist1d", num_samples=n)
    seed_everything(0)
    model = build_model("rescnn1d", task)
    t0 = time.perf_counter()
    fit(model, task, TrainConfig(epochs=3 if quick else 10, lr=0.002, optimizer="AdamW", scheduler="CosineAnnealingLR"))
    train_s = time.perf_counter() - t0
    model.eval()
    out = Path(os.environ.get("B9_OUT", "/tmp/torchslim-b9"))
    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(model, out / "baseline.safetensors")
    space = build_space(model, task, keep_min=0.25, step=8)
    t0 = time.perf_counter()
    cm = build_cost_model(model, space, task, batch_size=256, threads=1, grid=9, repeats=5 if quick else 7)
    table_s = time.perf_counter() - t0
    log(f"baseline test {task.evaluate(model):.4f}; table {table_s:.1f}s, curve {cm.curve}")
    base = {"task": {"name": "mnist1d", "kwargs": {"num_samples": n}},
            "model": {"name": "rescnn1d", "weights": str(weights)}, "seed": 0,
            "measure": {"batch_size": 256, "threads": 1}}
    return task, model, space, cm, base, {"train_seconds": train_s, "table_seconds": table_s, "num_samples": n}


def _arm(name: str, seed: int, trials: int, make_ev, out: Path) -> dict:
    from torchslim.search import agent, optuna_search, rules
    from torchslim.search.trials import best

    ev = make_ev()
    t0 = time.perf_counter()
    if name == "uniform":
        ev(rules.uniform(ev.space, ev.cost, ev.budget.ratio)[0], maker=name, fitted=True)
        recs = ev.trials
    elif name == "sensitivity":
        sens = rules.group_sensitivity(ev.model, ev.task, ev.space)
        ev(rules.sensitivity_rule(sens, ev.space, ev.cost, ev.budget.ratio)[0], maker=name, fitted=True)
        recs = ev.trials
    elif name == "rl":
        recs = agent.run(ev, trials, seed=seed)
    else:
        db = out / f"{name}-{seed}.db"
        if db.exists():
            db.unlink()
        recs = optuna_search.run(ev, name, trials, f"sqlite:///{db}", f"b9-{name}-{seed}", seed=seed)
    top = best(recs)
    return {"arm": name, "seed": seed, "evaluated": len(recs), "seconds": time.perf_counter() - t0,
            "best_val": top["val"], "best_test": top["test"], "best_latency_ratio_pred": top["latency_ratio"],
            "best_macs_ratio": top["macs_ratio"], "best_policy": top["policy"],
            "all": [{k: r[k] for k in ("val", "test", "latency_ratio", "macs_ratio")} for r in recs]}


def _distributed_check(make_ev, out: Path, trials: int = 6) -> dict:
    """2 threads of Optuna workers on one JournalStorage file: every trial number once."""
    import threading

    import optuna

    from torchslim.search import optuna_search

    path = out / "dist.journal"
    if path.exists():
        path.unlink()
    storage = optuna_search.storage_for(f"journal:{path}", "")
    optuna_search.study("random", storage, "b9-dist", 0, trials)

    def work(w: int) -> None:
        optuna_search.run(make_ev(), "random", trials, storage, "b9-dist", seed=100 + w)

    ths = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    st = optuna.load_study(study_name="b9-dist", storage=storage)
    done = [t.number for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"workers": 2, "kind": "threads in one process, JournalFileBackend", "requested": trials,
            "complete": len(done), "numbers": sorted(done), "all_trials": len(st.trials),
            "lost_or_duplicated": abs(len(set(done)) - trials) + (len(done) - len(set(done)))}


def _worker_scaling(out: Path, trials: int) -> dict:
    """torchslim search with 1 and with 2 worker processes on one journal file, the same total
    number of trials: wall time, best val, and every trial exactly once (issue 13's distributed
    benchmark; a MACs budget, so no latency table is timed inside the runs)."""
    import json

    import yaml

    from torchslim.search_app import run_search

    rows = {}
    for workers in (1, 2):
        src = {"task": {"name": "mnist1d", "kwargs": {"num_samples": 4000}},
               "model": {"name": "rescnn1d", "kwargs": {"width": 16}}, "seed": 0, "train": {"epochs": 5},
               "measure": {"batch_size": 64, "threads": 1},
               "search": {"budget": {"macs": "0.5x"}, "method": "random", "trials": trials, "step": 2,
                          "workers": workers, "finetune": {"max_steps": 600, "epochs": 50}}}
        folder = out / f"scaling-{workers}"
        folder.mkdir(parents=True, exist_ok=True)
        recipe = folder / "search.yaml"
        recipe.write_text(yaml.safe_dump(src))
        t0 = time.perf_counter()
        rc = run_search(recipe, folder / "out", log=lambda s: None)
        seconds = time.perf_counter() - t0
        recs = json.loads((folder / "out" / "trials.json").read_text())
        numbers = [r.get("optuna_trial") for r in recs]
        rows[workers] = {"rc": rc, "seconds": seconds, "trials": len(recs), "best_val": max(r["val"] for r in recs),
                         "lost_or_duplicated": abs(len(set(numbers)) - trials) + (len(numbers) - len(set(numbers)))}
    return {"total_trials": trials, "one_worker": rows[1], "two_workers": rows[2],
            "speedup": rows[1]["seconds"] / rows[2]["seconds"],
            "what": "wall time of the whole `torchslim search` (baseline training and setup included) at equal total trials"}


def run(quick: bool = False, log=print) -> dict:
    from torchslim.search import Budget, Policy
    from torchslim.search import cost as cost_mod
    from torchslim.search.trials import Evaluator

    torch.set_num_threads(1)
    trials = int(os.environ.get("B9_TRIALS", "4" if quick else "12"))
    seeds = int(os.environ.get("B9_SEEDS", "1" if quick else "3"))
    t_start = time.perf_counter()
    task, model, space, cm, base, setup = _setup(quick, log)
    out = Path(os.environ.get("B9_OUT", "/tmp/torchslim-b9"))
    finetune = {"epochs": 1, "lr": 0.001}

    def make_ev():
        return Evaluator(model, task, space, cm, Budget("latency", 0.5), base, finetune, log=log)

    arms = []
    for name in ("uniform", "sensitivity"):
        arms.append(_arm(name, 0, 1, make_ev, out))
    for seed in range(seeds):
        for name in ("random", "tpe", "rl"):
            arms.append(_arm(name, seed, trials, make_ev, out))
            log(f"{name} seed {seed}: best val {arms[-1]['best_val']:.4f} test {arms[-1]['best_test']:.4f} "
                f"({arms[-1]['seconds']:.0f}s)")
    search_s = time.perf_counter() - t_start

    def stats(name: str) -> dict:
        rows = [a for a in arms if a["arm"] == name]
        tests = [a["best_test"] for a in rows]
        return {"seeds": len(rows), "evaluated_per_seed": rows[0]["evaluated"], "best_test_mean": statistics.mean(tests),
                "best_test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0, "best_test_each": tests,
                "best_val_mean": statistics.mean(a["best_val"] for a in rows),
                "seconds_mean": statistics.mean(a["seconds"] for a in rows)}

    summary = {n: stats(n) for n in ("uniform", "sensitivity", "random", "tpe", "rl")}
    uni = summary["uniform"]["best_test_mean"]
    searched = max(("sensitivity", "random", "tpe", "rl"), key=lambda n: summary[n]["best_test_mean"])
    # the winners' latency, measured end to end (interleaved with the baseline) vs the table
    chosen = [Policy.from_dict(next(a for a in arms if a["arm"] == n)["best_policy"]) for n in summary]
    checks = cost_mod.check(cm, model, chosen, task, batch_size=256, threads=1, repeats=15)
    for n, c in zip(summary, checks):
        c["arm"] = n
    dist = _distributed_check(make_ev, out, trials=4 if quick else 6)
    scaling = _worker_scaling(out, trials=4 if quick else 12)
    log(f"1 vs 2 workers: {scaling['one_worker']['seconds']:.0f}s vs {scaling['two_workers']['seconds']:.0f}s")
    return {
        "two_worker_speedup": scaling["speedup"],
        "worker_scaling": scaling,
        "gain_over_uniform_pt": 100 * (summary[searched]["best_test_mean"] - uni),
        "best_searched_arm": searched,
        "rl_minus_random_pt": 100 * (summary["rl"]["best_test_mean"] - summary["random"]["best_test_mean"]),
        "tpe_minus_random_pt": 100 * (summary["tpe"]["best_test_mean"] - summary["random"]["best_test_mean"]),
        "search_minutes": search_s / 60,
        "lost_or_duplicated_trials": dist["lost_or_duplicated"] + scaling["one_worker"]["lost_or_duplicated"]
        + scaling["two_workers"]["lost_or_duplicated"],
        "latency_model_mean_abs_error": statistics.mean(abs(c["rel_error"]) for c in checks),
        "arms": summary, "runs": arms, "latency_checks": checks, "distributed": dist,
        "latency_table": {"curve": cm.curve, "calibration": cm.calibration, "notes": cm.notes,
                          "base_ms": cm.base_ms},
        "budget": {"kind": "latency", "ratio": 0.5, "runtime": "PyTorch eager", "batch": 256},
        "latency_threads": 1, "trials_per_arm": trials, "seeds": seeds, "finetune": finetune,
        "test_samples": len(task.test.dataset), "val_samples": len(task.val.dataset),
        "baseline_test": task.evaluate(model), **setup,
        "minilm_speedup_at_fidelity": None, "minilm_mean_cosine": None, "minilm_top10": None,
        "notes": ("2-core machine: latency ratios are interleaved (p10 basis when contended; see each "
                  "check's warnings), the table's error is stated; accuracy is on the test split of the "
                  "best-by-val policy; the MiniLM part is not measured."),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as runner  # benchmarks/run.py: writes results/B9-<isa>.json and the README table

    raise SystemExit(runner.main(["B9"] + sys.argv[1:]))

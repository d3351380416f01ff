"""B10: early exits and a cascade on rescnn1d / MNIST-1D — real (not simulated) skipping.

A dense rescnn1d (width 64) is trained with torchslim.train.fit. Then:

- exits: ``early_exit`` puts heads (64 hidden units) after ``layers.0`` and ``layers.1``, trained
  with the backbone frozen (distilled from the final head), calibrated on the val split for
  <= 0.5 pt accuracy drop against the dense model (maxprob policy). This configuration was
  picked among three tried (distill, distill + 64 hidden, joint) by the lowest *val* expected
  cost within the bound; the joint variant's figures are kept under ``joint``;
- cascade: a structurally pruned copy (25% of the MACs, fine-tuned) answers first, the dense
  model takes the rest, calibrated the same way;
- composition: exits (frozen backbone, distilled heads) on a pruned (50% MACs) + int8
  fake-quant (torchslim's "simulate" backend) model, against that model alone;
- the "every sample runs to the end" check: the exit model with thresholds no sample meets,
  against dense and against segments + heads without exit tests, all timed in the same repeats.

Latency: mean time per test sample of one pass over the test set at batch 1 and batch 64, all
candidates timed round-robin in the same repeats (torchslim.measure.compare_latency, 1 torch
thread), eager PyTorch and TorchScript (the exported form). Speedup = dense median / candidate
median. Re-run on a quiet machine with ``python benchmarks/b10_early_exit.py`` (or run.py B10).
MiniLM is not part of this run: transformers is not installed in this environment.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from torchslim.dynamic import CascadeConfig, ExitConfig, cascade, early_exit, to_torchscript
from torchslim.dynamic.exits import set_threshold
from torchslim.dynamic.policy import NEVER
from torchslim.measure import compare_latency
from torchslim.measure_timing import timing_warnings
from torchslim.train import TrainConfig, fit
from torchslim.zoo import build_model, build_task

ID = "B10"
TITLE = "Early exits + cascade on rescnn1d/MNIST-1D: mean latency per sample at batch 1 and 64"
EXITS = ("layers.0", "layers.1")  # an exit after layers.2 would save <= 19% of MACs for ~4% of head cost
HEADLINE = ["mean_latency_speedup", "accuracy_drop_pt", "exit_rates", "batch1_speedup", "batch64_speedup"]
NOTES = ("2-core machine (check the timing warnings of each latency block): ratios are from interleaved repeats "
         "(p10 basis when a contention warning fired), absolute times are not meaningful.")


def _acc(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(-1) == y).float().mean())


def _pass(fn, x: torch.Tensor, batch: int):
    chunks = list(x.split(batch))
    return lambda: [fn(c) for c in chunks]


def _timed(cands: dict, x: torch.Tensor, batch: int, repeats: int) -> dict:
    res = compare_latency({k: _pass(f, x, batch) for k, f in cands.items()}, warmup=1, repeats=repeats, threads=1)
    warn = timing_warnings(res)
    basis = "p10_ms" if warn else "median_ms"
    n = len(x)
    return {"per_sample_ms": {k: v[basis] / n for k, v in res.items()},
            "speedup_vs_dense": {k: res["dense"][basis] / v[basis] for k, v in res.items()},
            "basis": basis.removesuffix("_ms"), "warnings": warn, "raw": res, "samples": n, "batch": batch}


def run(quick: bool) -> dict:
    task = build_task("mnist1d", num_samples=4000 if quick else 20000, batch_size=128)
    epochs, ft = (3, 1) if quick else (10, 3)
    train = lambda e, lr, seed=0: TrainConfig(epochs=e, lr=lr, optimizer="Adam", scheduler="CosineAnnealingLR",
                                              seed=seed, device="cpu")
    torch.manual_seed(0)
    dense = build_model("rescnn1d", task, width=64)
    fit(dense, task, train(epochs, 3e-3))
    dense.eval()
    xs, ys = zip(*task.test)
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        dense_acc = _acc(dense(x), y)
    print(f"  dense test acc {dense_acc:.4f}", flush=True)

    res = early_exit(dense, ExitConfig(include=EXITS, mode="distill", head_hidden=64, accuracy_drop=0.005,
                                       finetune=train(ft + 1, 2e-3)), task)
    ee = res.model.eval()
    with torch.no_grad():
        ee_out, where = ee.forward_with_exits(x)
    ee_acc = _acc(ee_out, y)
    exit_rates = (torch.bincount(where, minlength=len(ee.stages) + 1).float() / len(x)).tolist()
    print(f"  exits test acc {ee_acc:.4f}, exit rates {[round(r, 3) for r in exit_rates]}", flush=True)

    joint = early_exit(dense, ExitConfig(include=EXITS, accuracy_drop=0.005, finetune=train(ft, 1e-3)), task).info
    joint = {k: joint[k] for k in ("test_accuracy", "test_exit_rates", "test_cost_frac", "val_accuracy",
                                   "reference_val_accuracy", "full_test_accuracy", "expected_cost_frac", "budget_met")}
    joint["accuracy_drop_pt"] = 100 * (dense_acc - joint["test_accuracy"])
    from torchslim.prune.structured import StructuredPruneConfig, prune_structured

    small, _ = prune_structured(dense, StructuredPruneConfig(macs_keep=0.25, criterion="l2"), task)
    fit(small, task, train(ft, 1e-3))
    cres = cascade(dense, CascadeConfig(small=small.eval(), accuracy_drop=0.005), task)
    casc = cres.model.eval()
    with torch.no_grad():
        c_out, c_where = casc.forward_with_exits(x)
        small_acc = _acc(small(x), y)
    casc_acc = _acc(c_out, y)
    print(f"  cascade test acc {casc_acc:.4f} (small alone {small_acc:.4f}), to large {float(c_where.float().mean()):.3f}",
          flush=True)

    never = copy.deepcopy(ee).eval()
    set_threshold(never, NEVER)

    dense_ts, ee_ts = torch.jit.script(copy.deepcopy(dense)), to_torchscript(ee)
    cands = {"dense": dense, "exits": ee, "cascade": casc, "dense_torchscript": dense_ts, "exits_torchscript": ee_ts,
             "exits_never_exit": never, "dense_plus_heads": ee.all_logits}
    n1 = 600 if quick else 2000  # batch 1 over a fixed prefix of the test set (time budget)
    with torch.inference_mode():
        b64 = _timed(cands, x, 64, 5 if quick else 15)
        b1 = _timed(cands, x[:n1], 1, 3 if quick else 7)

    with torch.no_grad():
        _, w1 = ee.forward_with_exits(x[:n1])
        exit_rates_b1_subset = (torch.bincount(w1, minlength=len(ee.stages) + 1).float() / n1).tolist()
    sp = lambda b, k: b["speedup_vs_dense"][k]
    overhead = {b["batch"]: sp(b, "dense") / sp(b, "exits_never_exit") - 1 for b in (b1, b64)}
    heads_cost = {b["batch"]: sp(b, "dense") / sp(b, "dense_plus_heads") - 1 for b in (b1, b64)}
    beyond = {k: (1 + overhead[k]) / (1 + heads_cost[k]) - 1 for k in overhead}
    composition = _composition(dense, task, x, y, train, ft, quick)
    speed1, speed64 = b1["speedup_vs_dense"]["exits"], b64["speedup_vs_dense"]["exits"]
    return {
        "mean_latency_speedup": (speed1 + speed64) / 2, "batch1_speedup": speed1, "batch64_speedup": speed64,
        "accuracy_drop_pt": 100 * (dense_acc - ee_acc), "exit_rates": exit_rates,
        "torchscript_batch1_speedup": b1["speedup_vs_dense"]["exits_torchscript"] / b1["speedup_vs_dense"]["dense_torchscript"],
        "torchscript_batch64_speedup": b64["speedup_vs_dense"]["exits_torchscript"] / b64["speedup_vs_dense"]["dense_torchscript"],
        "cascade": {"batch1_speedup": b1["speedup_vs_dense"]["cascade"], "batch64_speedup": b64["speedup_vs_dense"]["cascade"],
                    "accuracy_drop_pt": 100 * (dense_acc - casc_acc), "small_acc": small_acc,
                    "share_to_large": float(c_where.float().mean()), "info": cres.info},
        "run_to_end_check": {"overhead_vs_dense": overhead, "heads_cost_vs_dense": heads_cost,
                             "overhead_beyond_heads": beyond, "holds": {k: v <= 0.05 for k, v in beyond.items()},
                             "what": "exit model with thresholds no sample meets (every sample runs every block, "
                                     "head and exit test) vs dense; heads' cost = segments + heads without exit "
                                     "tests (all_logits) vs dense, timed in the same repeats; holds = the exit "
                                     "model is within 5% of dense + heads"},
        "joint": {**joint, "note": "joint fine-tune of backbone + heads; accuracy and MACs cost only, not timed"},
        "dense_acc": dense_acc, "exits_acc": ee_acc, "test_size": len(x), "batch1_samples": n1,
        "exit_rates_batch1_subset": exit_rates_b1_subset,
        "exit_info": {k: v for k, v in res.info.items() if k != "fit"},
        "latency": {"batch1": b1, "batch64": b64}, "latency_threads": 1,
        "composition": composition, "dense_epochs": epochs, "finetune_epochs": ft, "seeds": [0], "notes": NOTES,
    }


def _composition(dense, task, x, y, train, ft, quick) -> dict:
    """Exits (frozen backbone, distilled heads) on a pruned (50% MACs) + int8 fake-quant model."""
    from torchslim.prune.structured import StructuredPruneConfig, prune_structured
    from torchslim.quantize import QuantConfig, quantize

    pruned, _ = prune_structured(dense, StructuredPruneConfig(macs_keep=0.5, criterion="l2"), task)
    fit(pruned, task, train(ft, 1e-3))
    q = quantize(pruned.eval(), QuantConfig(backend="simulate"), task).model.eval()
    with torch.no_grad():
        q_acc = _acc(q(x), y)
    out = {"pruned_int8_acc": q_acc, "backend": "simulate (fake-quant int8 weights and activations)"}
    try:
        r = early_exit(q, ExitConfig(include=EXITS, mode="distill", head_hidden=64, accuracy_drop=0.005,
                                     finetune=train(ft + 1, 2e-3)), task)
    except Exception as exc:  # noqa: BLE001 - the figure records why composition failed
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    qe = r.model.eval()
    with torch.no_grad():
        o, w = qe.forward_with_exits(x)
    out.update(exits_acc=_acc(o, y), exit_rates=(torch.bincount(w, minlength=len(qe.stages) + 1).float() / len(x)).tolist())
    cands = {"dense": dense, "pruned_int8": q, "pruned_int8_exits": qe}
    with torch.inference_mode():
        lat = _timed(cands, x, 64, 5 if quick else 11)
        lat1 = _timed(cands, x[:300 if quick else 1000], 1, 3 if quick else 5)
    out.update(batch64_speedup_vs_dense=lat["speedup_vs_dense"], batch1_speedup_vs_dense=lat1["speedup_vs_dense"],
               latency={"batch64": lat, "batch1": lat1},
               accuracy_drop_vs_pruned_int8_pt=100 * (q_acc - out["exits_acc"]))
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import main

    raise SystemExit(main([ID] + sys.argv[1:]))

"""B10, MiniLM row: early exits and a cascade on a fine-tuned MiniLM classifier — measured skipping.

Task and model (src/torchslim/zoo/text_task.py): ``text_topics``, 8-topic classification of
Python standard-library docstring sentences (real English, offline; stratified 60/20/20), and
``minilm_classifier``, a BertForSequenceClassification whose ``bert`` is the bundled pretrained
all-MiniLM-L6-v2 with a fresh head. Steps:

- fine-tune the whole classifier (AdamW, cosine LR, a fixed number of epochs); it is the
  "full model" every figure is measured against;
- exits after encoder layers 0-4 (``early_exit``, maxprob, one shared threshold calibrated on val
  for <= 0.5 pt accuracy drop), three ways to train the heads: ``deebert`` (DeeBERT's second
  stage: backbone frozen, heads on the labels, ``mode="distill", alpha=0``), ``self_distill``
  (FastBERT-like: frozen backbone, heads distilled from the final head, alpha 0.5) and ``joint``
  (backbone and heads together, head_weight 0.3, small LR). The headline is the variant with the
  lowest *val* expected cost within the bound (chosen on val, never on test); all are timed;
- cascade: a 2-layer MiniLM classifier (the fine-tuned model's embeddings, layers 0-1, pooler
  and classifier, fine-tuned again) answers first, the full model takes the rest
  (``cascade`` on the packed-tensor form of the task), calibrated for <= 0.5 pt;
- the run-to-end check: the headline exit model with thresholds no sample meets, against the
  full model, the split segments alone and segments + heads (no exit tests), wall and CPU time.

Latency: mean time per test sample of one pass at batch 64 (the test set in its order, each batch
padded to its own longest sentence) and at batch 1 (a prefix of the test set, no padding), all
candidates round-robin in the same repeats (torchslim.core.measure.compare_latency, 1 torch
thread), eager PyTorch. Speedup = full-model time / candidate time (median; p10 when a timing
warning fired). At batch 64 the rows left after an exit run at their own longest length
(dynamic/hf_bert.py drops the columns that are padding in all of them).

    HF_HUB_OFFLINE=1 python benchmarks/b10_minilm.py [--quick] [--fresh]

writes the "minilm" key of benchmarks/results/B10-<isa>.json (the rest of the file untouched).
``--fresh`` retrains the fine-tuned models instead of loading them from the cache (keyed by
data, model file, budgets and library versions). ``run.py B10M`` runs it too (run.py then writes
results/B10M-<isa>.json; it knows one ID per file). NOTE: ``run.py B10`` rewrites B10-<isa>.json
and drops the "minilm" key: rerun this script after it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from torchslim.core.measure import compare_latency
from torchslim.core.measure.latency import torch_threads
from torchslim.core.measure.timing import timing_warnings
from torchslim.core.train import TrainConfig, fit
from torchslim.dynamic import CascadeConfig, ExitConfig, cascade, early_exit
from torchslim.dynamic.exits import set_threshold
from torchslim.dynamic.policy import NEVER
from torchslim.zoo.text_task import (
    PackedClassifier,
    make_loader,
    minilm_classifier,
    pack,
    packed_task,
    pad_batch,
    text_topics,
    texts_and_labels,
)

ID = "B10"
PART_OF = "B10"  # writes its keys into results/B10-<isa>.json; run.py skips it: run this file directly
TITLE = "B10 MiniLM row: early exits + cascade on a fine-tuned MiniLM classifier (text_topics), batch 1 and 64"
HEADLINE = ["mean_latency_speedup", "accuracy_drop_pt", "exit_rates", "batch1_speedup", "batch64_speedup"]
EXITS = tuple(f"bert.encoder.layer.{i}" for i in range(5))  # after every layer but the last (DeeBERT)
DROP = 0.005
NOTES = ("2-core machine shared with other work (check each latency block's timing warnings and the load "
         "averages): ratios are from interleaved repeats (p10 basis when a contention warning fired), absolute "
         "times are not meaningful.")


def _budgets(quick: bool) -> dict:
    if quick:
        return {"epochs": 1, "max_steps": 3, "head_epochs": 1, "joint_epochs": 1, "small_epochs": 1, "n_eval": 64,
                "n_train": 128, "n1": 16, "n_order": 64, "rep64": 2, "rep1": 2, "rep_end": 3}
    return {"epochs": 4, "max_steps": None, "head_epochs": 4, "joint_epochs": 2, "small_epochs": 3, "n_eval": None,
            "n_train": None, "n1": 200, "n_order": 128, "rep64": 7, "rep1": 5, "rep_end": 9}


def _train(epochs: int, lr: float, b: dict, seed: int = 0) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, optimizer="AdamW", scheduler="CosineAnnealingLR", seed=seed,
                       device="cpu", max_steps=b["max_steps"])


def _subset(task, n_train: int | None, n_eval: int | None):
    """The task with its splits cut to their first rows (quick runs)."""
    import dataclasses

    def cut(dl, n, seed):
        ds = dl.dataset
        n = len(ds) if n is None else min(n, len(ds))
        return make_loader(ds.ids[:n], ds.labels[:n], dl.batch_sampler.batch_size, seed)

    if n_train is None and n_eval is None:
        return task
    return dataclasses.replace(task, train=cut(task.train, n_train, 0), val=cut(task.val, n_eval, None),
                               test=cut(task.test, n_eval, None))


def _cached_fit(model, task, cfg: TrainConfig, tag: str, fresh: bool) -> dict:
    """fit, or load the weights a previous run with the same data, model file and budget got."""
    import transformers

    from torchslim.zoo.minilm import _model_digest, cache_dir

    texts, labels = texts_and_labels()
    src = "\n".join([tag, _model_digest(), repr(cfg), torch.__version__, transformers.__version__,
                     str(len(task.train.dataset)), repr(labels), *texts])
    path = cache_dir() / "b10_minilm" / f"{tag}-{hashlib.sha256(src.encode()).hexdigest()[:20]}.pt"
    if not fresh and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return {"from_cache": str(path)}
    t0 = time.perf_counter()
    fit(model, task, cfg)
    from torchslim.core.utils import atomic_write

    atomic_write(path, lambda p: torch.save(model.state_dict(), p))
    return {"from_cache": None, "seconds": round(time.perf_counter() - t0, 1)}


def _two_layer(model):
    small = copy.deepcopy(model)
    small.bert.encoder.layer = small.bert.encoder.layer[:2]
    small.config.num_hidden_layers = 2
    return small


def _chunks(task, batch: int, n: int | None = None, by_length: bool = True) -> tuple[list[dict], torch.Tensor]:
    """Test rows (the first n in split order) in batches padded to their own longest row, sorted by
    length first (as a throughput pipeline batches text) unless by_length=False; and their labels."""
    ds = task.test.dataset
    rows = list(range(len(ds) if n is None else min(n, len(ds))))
    if by_length:
        rows.sort(key=lambda i: (len(ds.ids[i]), i))
    chunks = [pad_batch([ds[i] for i in rows[j:j + batch]])[0] for j in range(0, len(rows), batch)]
    return chunks, torch.tensor([ds.labels[i] for i in rows])


def _timed(cands: dict, chunks: list[dict], repeats: int) -> dict:
    runs = {k: (lambda f=f: [f(c) for c in chunks]) for k, f in cands.items()}
    res = compare_latency(runs, warmup=1, repeats=repeats, threads=1)
    warn = timing_warnings(res)
    basis = "p10_ms" if warn else "median_ms"
    n = sum(len(c["input_ids"]) for c in chunks)
    return {"per_sample_ms": {k: v[basis] / n for k, v in res.items()},
            "speedup_vs_dense": {k: res["dense"][basis] / v[basis] for k, v in res.items()},
            "basis": basis.removesuffix("_ms"), "warnings": warn, "raw": res, "samples": n,
            "batch": len(chunks[0]["input_ids"])}


def _cpu_timed(cands: dict, chunks: list[dict], repeats: int) -> dict:
    """Thread CPU time of one pass per candidate, round-robin (as b10_early_exit._cpu_timed: with
    one torch thread the work runs on this thread; CPU time leaves out time another process held
    the core)."""
    import statistics

    names, samples = list(cands), {k: [] for k in cands}
    with torch_threads(1), torch.inference_mode():
        for f in cands.values():
            [f(c) for c in chunks]
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.thread_time_ns()
                [cands[name](c) for c in chunks]
                samples[name].append(time.thread_time_ns() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    n = sum(len(c["input_ids"]) for c in chunks)
    return {"per_sample_cpu_ms": {k: v / 1e6 / n for k, v in med.items()},
            "speedup_vs_dense": {k: med["dense"] / v for k, v in med.items()}, "samples": n, "repeats": repeats,
            "batch": len(chunks[0]["input_ids"])}


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


@torch.no_grad()
def _run_exits(ee, chunks: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [ee.forward_with_exits(c) for c in chunks]
    return torch.cat([o for o, _ in outs]), torch.cat([w for _, w in outs])


def _variant(name: str, res, chunks, y, dense_acc) -> dict:
    ee = res.model.eval()
    out, where = _run_exits(ee, chunks)
    keep = ("val_accuracy", "reference_val_accuracy", "full_val_accuracy", "budget_met", "expected_cost_frac",
            "test_accuracy", "full_test_accuracy", "test_exit_rates", "test_cost_frac", "head_accuracy_val",
            "threshold", "costs")
    info = {k: res.info[k] for k in keep}
    acc = _acc(out, y)
    rates = (torch.bincount(where, minlength=len(ee.stages) + 1).float() / len(y)).tolist()
    print(f"  {name}: val cost {info['expected_cost_frac']:.3f} (budget met {info['budget_met']}), test acc "
          f"{acc:.4f} (full {dense_acc:.4f}), exit rates {[round(r, 3) for r in rates]}", flush=True)
    curve, ref = res.info["curve"], res.info["reference_val_accuracy"]
    pts = list(zip(curve["accuracy"], curve["mean_cost"]))
    trade = {f"val_cost_within_{d}pt": min((c for a, c in pts if a >= ref - d / 100 - 1e-12), default=None)
             for d in (0.5, 1, 2, 5)}
    trade["val_drop_pt_at_cost_0.5"] = 100 * (ref - max((a for a, c in pts if c <= 0.5), default=float("nan")))
    return {**info, "batch64_test_accuracy": acc, "accuracy_drop_pt": 100 * (dense_acc - acc), "exit_rates": rates,
            "val_trade_off": trade}


def run(quick: bool, fresh: bool = False) -> dict:
    start, load0, phases = time.perf_counter(), os.getloadavg(), {}
    b = _budgets(quick)
    task = _subset(text_topics(batch_size=32, seed=0), b["n_train"], b["n_eval"])
    torch.manual_seed(0)
    dense = minilm_classifier(num_classes=task.num_classes, dropout=0.1, seed=0)
    ft = _cached_fit(dense, task, _train(b["epochs"], 1e-4, b), "full", fresh)
    dense.eval()
    phases["fine_tune"] = round(time.perf_counter() - start, 1)
    chunks64, y = _chunks(task, 64)
    chunks1, _ = _chunks(task, 1, b["n1"], by_length=False)
    in_order, _ = _chunks(task, 64, b["n_order"], by_length=False)
    with torch.no_grad():
        dense_acc = _acc(torch.cat([dense(**c).logits for c in chunks64]), y)
    print(f"  full model test acc {dense_acc:.4f} ({len(y)} sentences)", flush=True)

    t = time.perf_counter()
    heads = lambda e, lr: _train(e, lr, b)
    configs = {
        "deebert": ExitConfig(layers=EXITS, mode="distill", alpha=0.0, head_hidden=128, accuracy_drop=DROP,
                              finetune=heads(b["head_epochs"], 2e-3)),
        "self_distill": ExitConfig(layers=EXITS, mode="distill", alpha=0.5, head_hidden=128, accuracy_drop=DROP,
                                   finetune=heads(b["head_epochs"], 2e-3)),
        "joint": ExitConfig(layers=EXITS, mode="joint", head_weight=0.3, head_hidden=128, accuracy_drop=DROP,
                            finetune=heads(b["joint_epochs"], 3e-5)),
    }
    results = {k: early_exit(dense, cfg, task) for k, cfg in configs.items()}
    variants = {k: _variant(k, r, chunks64, y, dense_acc) for k, r in results.items()}
    phases["exits"] = round(time.perf_counter() - t, 1)
    within = [k for k, v in variants.items() if v["budget_met"]] or list(variants)
    best = min(within, key=lambda k: variants[k]["expected_cost_frac"])
    ee = results[best].model.eval()

    t = time.perf_counter()
    small = _two_layer(dense).train()
    sft = _cached_fit(small, task, _train(b["small_epochs"], 1e-4, b), "small2", fresh)
    small.eval()
    ptask = packed_task(task)
    cres = cascade(PackedClassifier(dense), CascadeConfig(small=PackedClassifier(small), accuracy_drop=DROP), ptask)
    casc = cres.model.eval()
    with torch.no_grad():
        co = [casc.forward_with_exits(pack(c)) for c in chunks64]
        casc_acc, c_where = _acc(torch.cat([o for o, _ in co]), y), torch.cat([w for _, w in co])
        small_acc = _acc(torch.cat([small(**c).logits for c in chunks64]), y)
    print(f"  cascade test acc {casc_acc:.4f} (2-layer alone {small_acc:.4f}), to the full model "
          f"{float(c_where.float().mean()):.3f}", flush=True)
    phases["cascade"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    cands = {"dense": lambda c: dense(**c).logits, "cascade": lambda c: casc.forward_with_exits(pack(c)),
             "small_alone": lambda c: small(**c).logits}
    cands.update({f"exits_{k}": (lambda c, m=r.model: m.forward_with_exits(c)) for k, r in results.items()})
    with torch.inference_mode():
        b64 = _timed(cands, chunks64, b["rep64"])
        b1 = _timed(cands, chunks1, b["rep1"])
        # batches as the test set comes (not sorted by length): padded to each batch's longest row;
        # the rows left after an exit run at their own longest length (hf_bert.py)
        order = _timed({"dense": cands["dense"], f"exits_{best}": cands[f"exits_{best}"]}, in_order, b["rep1"])
    phases["latency"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    never = copy.deepcopy(ee).eval()
    set_threshold(never, NEVER)
    segs = ee.segment_list()

    def segments_only(c):
        h = ee.prepare(c)
        for seg in segs:
            h = seg(h)
        return h

    end = {"dense": cands["dense"], "segments": segments_only, "dense_plus_heads": lambda c: ee.all_logits(ee.prepare(c)),
           "exits_never_exit": never.forward_with_exits}
    half, every_other = chunks1[: max(1, len(chunks1) // 2)], chunks64[::2]  # (time budget)
    with torch.inference_mode():
        e64, e1 = _timed(end, every_other, b["rep_end"]), _timed(end, half, b["rep_end"])
    c64, c1 = _cpu_timed(end, every_other, b["rep_end"]), _cpu_timed(end, half, b["rep_end"])
    phases["run_to_end"] = round(time.perf_counter() - t, 1)
    sp = lambda r, k: r["speedup_vs_dense"][k]
    overhead = {r["batch"]: sp(r, "dense") / sp(r, "exits_never_exit") - 1 for r in (e1, e64)}
    heads_cost = {r["batch"]: sp(r, "dense") / sp(r, "dense_plus_heads") - 1 for r in (e1, e64)}
    beyond = {k: (1 + overhead[k]) / (1 + heads_cost[k]) - 1 for k in overhead}
    cpu_beyond = {r["batch"]: sp(r, "dense_plus_heads") / sp(r, "exits_never_exit") - 1 for r in (c1, c64)}

    with torch.no_grad():
        w1 = torch.cat([ee.forward_with_exits(c)[1] for c in chunks1])
    s1, s64 = b1["speedup_vs_dense"][f"exits_{best}"], b64["speedup_vs_dense"][f"exits_{best}"]
    v = variants[best]
    return {
        "mean_latency_speedup": (s1 + s64) / 2, "batch1_speedup": s1, "batch64_speedup": s64,
        "accuracy_drop_pt": v["accuracy_drop_pt"], "exit_rates": v["exit_rates"], "headline_variant": best,
        "target_2x_met": {"batch1": s1 >= 2.0, "batch64": s64 >= 2.0},
        "deebert_bar_40pct_saved_met": {"batch1": 1 - 1 / s1 >= 0.4, "batch64": 1 - 1 / s64 >= 0.4},
        "variants": {k: {**vv, "batch1_speedup": b1["speedup_vs_dense"][f"exits_{k}"],
                         "batch64_speedup": b64["speedup_vs_dense"][f"exits_{k}"]} for k, vv in variants.items()},
        "cascade": {"batch1_speedup": sp(b1, "cascade"), "batch64_speedup": sp(b64, "cascade"),
                    "accuracy_drop_pt": 100 * (dense_acc - casc_acc), "small_acc": small_acc,
                    "share_to_large": float(c_where.float().mean()), "accuracy_bound_pt": 100 * DROP,
                    "small_alone_batch1_speedup": sp(b1, "small_alone"), "small_alone_batch64_speedup": sp(b64, "small_alone"),
                    "small": "2-layer MiniLM classifier (layers 0-1 of the fine-tuned model, fine-tuned again)",
                    "small_fit": sft, "info": {k: vv for k, vv in cres.info.items() if k != "curve"}},
        "run_to_end_check": {"overhead_vs_dense": overhead, "heads_cost_vs_dense": heads_cost,
                             "overhead_beyond_heads": beyond, "holds": {k: x <= 0.05 for k, x in beyond.items()},
                             "cpu_time": {"overhead_beyond_heads": cpu_beyond,
                                          "holds": {k: x <= 0.05 for k, x in cpu_beyond.items()}, "batch1": c1, "batch64": c64},
                             "latency": {"batch1": e1, "batch64": e64},
                             "what": "headline exit model with thresholds no sample meets (every sample runs every layer, "
                                     "head and exit test) vs the full model; heads' cost = segments + heads without exit "
                                     "tests (all_logits); holds = within 5% of full + heads; segments = the split "
                                     "backbone alone (the packed form rebuilds the attention mask per segment)"},
        "dense_acc": dense_acc, "test_size": len(y), "batch1_samples": sum(len(c["input_ids"]) for c in chunks1),
        "exit_rates_batch1_subset": (torch.bincount(w1, minlength=len(ee.stages) + 1).float() / len(w1)).tolist(),
        "latency": {"batch1": b1, "batch64": b64, "batch64_test_order": order}, "latency_threads": 1,
        "batch64_test_order_speedup": order["speedup_vs_dense"][f"exits_{best}"],
        "batching": {"batch64": "test rows sorted by length, batches of 64 padded to their longest row",
                     "batch1": f"the first {b['n1']} test rows in split order, no padding",
                     "batch64_test_order": f"the first {b['n_order']} test rows in split order, batches of 64 "
                                           "padded to their longest row (dense and the headline exits only)"},
        "task": {"name": "text_topics", "classes": task.num_classes, "train": len(task.train.dataset),
                 "val": len(task.val.dataset), "test": len(y), "doc": "src/torchslim/zoo/text_task.py"},
        "fine_tune": {**ft, "epochs": b["epochs"], "lr": 1e-4, "optimizer": "AdamW", "scheduler": "CosineAnnealingLR"},
        "exits_after": list(EXITS), "policy": "maxprob", "seeds": [0], "phase_seconds": phases,
        "load_average_start": load0, "load_average_end": os.getloadavg(), "notes": NOTES, "quick": quick,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def write_minilm(result: dict) -> Path:
    """Put result under the "minilm" key of results/B10-<isa>.json (atomic: temp file + os.replace)."""
    from run import machine

    from torchslim.core.isa import isa_slug
    from torchslim.core.utils import atomic_write_text

    facts = machine()
    path = HERE / "results" / f"B10-{isa_slug(facts['isa'])}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"id": "B10"}
    data["minilm"] = {**result, "machine": facts}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny data and budgets (a smoke run; marked quick)")
    ap.add_argument("--fresh", action="store_true", help="fine-tune again instead of loading cached weights")
    args = ap.parse_args()
    print(f"wrote {write_minilm(run(args.quick, args.fresh))}")

"""B9, MiniLM part: the most faithful searched plan for all-MiniLM-L6-v2 at <= 0.33x the fp32
PyTorch latency, against the uniform arms and the single-technique int8 peers, in one run.

Space (``torchslim.search.transformer_space``): per encoder layer, heads kept (12 / 9 / 6) and FFN
units kept (1536 / 1344 / 1152 / 768, multiples of 64); per Linear group (Q/K/V, attention output,
FFN in, FFN out) int8 or float, FFN out also 8-bit weight blocks of 128 (B2's fidelity fix); one
SmoothQuant switch. A plan is a recipe (transformer_prune stages with ``layers.exclude``, then an
ONNX Runtime dynamic int8 ``quantize`` stage with ``layers.exclude``), applied exactly as the runner
applies it. Cost: every plan's real model timed end to end against PyTorch fp32, interleaved
(``compare_latency``), 1 thread, batches of 32 val sentences, once per plan. Search: Optuna TPE
(``constraints_func``: latency ratio <= 0.33), objective = mean cosine on the val sentences;
the first trials are the uniform arms (whole-model int8 on the fused and on the plain graph, int8 +
a uniform 25% FFN prune, int8 + SmoothQuant, B2's int8 + FFN-out blocks + SmoothQuant), enqueued; the graph fused or
not is a choice too (on the AVX-512 VNNI AMD EPYC it ran on, the plain graph was faster at 1 thread). Then one final interleaved timing at 1 thread on
the test batches B2 times (every other batch of 32) of fp32 PyTorch, ONNX Runtime fp32, the peers
(ORT quantize_dynamic default and per-channel, torchao int8, OpenVINO int8 when installed, built
by B2's own code), B2's hand plan, the arms and the best searched plans; the answer is the most
faithful plan (val cosine) that holds <= 0.33x there, reported on the test sentences.

    python benchmarks/b9_minilm.py            # writes results/B9-<isa>.json's minilm keys
    python benchmarks/b9_minilm.py --quick --out /tmp/b9m.json   # smoke run, not written there
Trials: B9_MINILM_TRIALS (default 20; --quick 4); a wall-clock cap B9_MINILM_SEARCH_S (default 720 s)
stops the search early, and the result says how many trials ran.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))  # b2_minilm_int8, peers_openvino

ID = "B9"
PART_OF = "B9"  # writes its keys into results/B9-<isa>.json; run.py skips it: run this file directly
TITLE = "MiniLM-L6: most faithful searched plan (heads/FFN/int8 per group) at <= 0.33x fp32 latency, vs int8 peers"
BUDGET = 0.33
TARGET = {"speedup": 3.0, "mean_cosine": 0.995, "top10": 0.95, "file_mb": 20.0}
PEERS = ("ort_dynamic_default", "ort_per_channel", "torchao_int8", "openvino_int8")
REFERENCES = ("torch_fp32", "ort_fp32", "openvino_fp32", "torchslim")  # torchslim = B2's hand plan


def _arms(space):
    """The uniform arms: whole-model int8 (fused graph, and as exported), int8 + a uniform 25% FFN
    prune, int8 + SmoothQuant, and B2's recipe (FFN out in 8-bit blocks, SmoothQuant), unfused."""
    from torchslim.search.transformer_space import b2_policy, uniform_policy

    b2 = b2_policy(space, fuse=False)
    return {"int8_all": uniform_policy(space), "int8_all_unfused": uniform_policy(space, fuse=False),
            "int8_ffn_prune_25_unfused": uniform_policy(space, ffn_keep=0.75, fuse=False),
            "int8_smooth_unfused": uniform_policy(space, smooth=True, fuse=False), "int8_blocks_smooth_unfused": b2}


def _time_all(models: dict, batches: list, repeats: int) -> dict:
    """Every model at 1 thread, interleaved; a model > 10x slower than fp32 (a probe) is timed in
    its own 3-repeat run against fp32 and scaled to the main run's fp32 median (as B2 does)."""
    from peers_openvino import OvModel

    from torchslim.core.measure import compare_latency
    from torchslim.core.task import call_model
    from torchslim.search.transformer_eval import at_threads

    ms = {k: m.with_threads(1) if isinstance(m, OvModel) else at_threads(m, 1) for k, m in models.items()}
    run = {k: (lambda m=m: [call_model(m, b) for b in batches]) for k, m in ms.items()}
    probe = compare_latency(run, warmup=0, repeats=1, threads=1)
    slow = [k for k in run if probe[k]["median_ms"] > 10 * probe["torch_fp32"]["median_ms"]]
    lat = compare_latency({k: f for k, f in run.items() if k not in slow}, warmup=1, repeats=repeats, threads=1)
    for k in slow:
        pair = compare_latency({"torch_fp32": run["torch_fp32"], k: run[k]}, warmup=0, repeats=3, threads=1)
        scale = lat["torch_fp32"]["median_ms"] / pair["torch_fp32"]["median_ms"]
        lat[k] = {**{key: v * scale for key, v in pair[k].items() if key.endswith("_ms")}, "load": pair[k]["load"],
                  "note": "> 10x slower than fp32: timed in its own 3-repeat run, scaled"}
    return lat


def _row(name, model, task, lat, ref_ms, file_mb, note, val=None):
    fid = task.evaluate_all(model, "test")
    return {"speedup_vs_torch_fp32": ref_ms / lat["median_ms"], "latency_ratio": lat["median_ms"] / ref_ms,
            "mean_cosine": fid["mean_cosine"], "top10_agreement": fid["top10_agreement"], "file_mb": file_mb,
            "median_ms": lat["median_ms"], "p10_ms": lat["p10_ms"], "p90_ms": lat["p90_ms"], "note": note,
            **({"val_cosine": val["val_cosine"], "val_top10": val["val_top10"],
                "search_latency_ratio": val["latency_ratio"]} if val else {}),
            **({"timing_note": lat["note"]} if "note" in lat else {})}


def _target_verdict(rows: dict) -> dict:
    """Is >= 3x at cosine >= 0.995, top-10 >= 0.95, file <= 20 MB met by any measured row; if not, by how much."""
    ok = {k: r for k, r in rows.items() if r["mean_cosine"] >= TARGET["mean_cosine"] and r["top10_agreement"] >= TARGET["top10"]
          and r["file_mb"] <= TARGET["file_mb"]}
    fast = {k: r for k, r in rows.items() if r["speedup_vs_torch_fp32"] >= TARGET["speedup"]}
    met = [k for k, r in ok.items() if r["speedup_vs_torch_fp32"] >= TARGET["speedup"]]
    best_ok = max(ok, key=lambda k: ok[k]["speedup_vs_torch_fp32"]) if ok else None
    best_fast = max(fast, key=lambda k: fast[k]["mean_cosine"]) if fast else None
    return {"target": TARGET, "met": bool(met), "rows_meeting_it": met,
            "fastest_at_fidelity": None if best_ok is None else {"row": best_ok, "speedup": ok[best_ok]["speedup_vs_torch_fp32"],
                                                                  "short_of_3x_by": max(0.0, 3.0 - ok[best_ok]["speedup_vs_torch_fp32"])},
            "most_faithful_at_3x": None if best_fast is None else {
                "row": best_fast, "mean_cosine": fast[best_fast]["mean_cosine"], "top10": fast[best_fast]["top10_agreement"],
                "cosine_short_by": max(0.0, 0.995 - fast[best_fast]["mean_cosine"]),
                "top10_short_by": max(0.0, 0.95 - fast[best_fast]["top10_agreement"])}}


def run(quick: bool = False, log=print) -> dict:
    import b2_minilm_int8 as b2
    import peers_openvino
    import torch

    from torchslim.core.isa import machine_facts
    from torchslim.search import transformer_eval as te
    from torchslim.search import transformer_space as ts
    from torchslim.zoo.minilm import load_minilm, minilm_task

    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    trials = int(os.environ.get("B9_MINILM_TRIALS") or (4 if quick else 20))
    search_s = float(os.environ.get("B9_MINILM_SEARCH_S") or (240 if quick else 720))
    sizes = {"n_sentences": 128 if quick else 512, "calib_sentences": 64 if quick else 128,
             "val_sentences": 64 if quick else 128, "batch_size": 32}
    task = minilm_task(**sizes)
    torch.manual_seed(0)
    model = load_minilm()
    space = ts.build_transformer_space(model)
    base = {"schema": 1, "name": "minilm searched plan (B9)", "task": {"name": "minilm", "kwargs": sizes},
            "model": "minilm", "seed": 0, "measure": {"batch_size": 32, "threads": 1, "repeats": 10}, "export": ["onnx"]}
    # every 4th test batch (all sentence lengths, ~128 sentences): int8's gain depends on the length,
    # so a trial is timed on the mix the final timing (every other batch) has; fidelity is val only
    timing = [b for i, (b, _) in enumerate(task.test) if i % 4 == 0]
    ev = te.PlanEvaluator(model, task, space, base, timing, budget=BUDGET, threads=1, repeats=5, keep=6,
                          log=lambda s: log(f"[{time.perf_counter() - t_start:6.0f}s]{s}"))
    arms = _arms(space)
    log(f"space: {len(space.layers)} layers, heads {space.heads[0]}, ffn {space.ffn[0]}, per-layer {space.per_layer}; "
        f"{trials} TPE trials (first {len(arms)} = the uniform arms), cap {search_s:.0f}s")
    t0 = time.perf_counter()
    arm_models = {}
    records = []
    for name, p in arms.items():  # the arms first (their models kept for the final timing) ...
        records.append(dict(ev(p, maker=f"arm:{name}"), trial=len(records)))
        arm_models[name] = ev.last_model
    left = max(0, trials - len(arms))
    if left:  # ... then TPE, told about the arms (cache hits), under the wall-clock cap
        recs = te.run_tpe(ev, left + len(arms), seed=0, enqueue=tuple(arms.values()),
                          timeout=max(1.0, search_s - (time.perf_counter() - t0)))
        records += [r for r in recs if not r.get("cached")]
    search_seconds = time.perf_counter() - t0
    log(f"search: {len(ev.cache)} distinct plans in {search_seconds:.0f}s")

    t1 = time.perf_counter()
    cands, b2_info, skipped = b2._candidates(model, task, torch.get_num_threads())
    build_peers_s = time.perf_counter() - t1
    cands.pop("torchslim_per_group_all", None)
    searched = sorted((ev.cache[k] for k in ev.models), key=lambda r: -r["val_cosine"])
    final = {k: cands[k][0] for k in (*REFERENCES, *PEERS) if k in cands}
    final.update({f"arm:{k}": m for k, m in arm_models.items()})
    arm_keys = {p.key() for p in arms.values()}
    searched = [r for r in searched if te.plan_key(r) not in arm_keys]
    for i, rec in enumerate(searched):
        final[f"plan:{i}"] = ev.models[te.plan_key(rec)]
    batches = [b for i, (b, _) in enumerate(task.test) if i % 2 == 0]  # B2's timed set: every other batch
    t2 = time.perf_counter()
    lat = _time_all(final, batches, 3 if quick else 7)
    ref_ms = lat["torch_fp32"]["median_ms"]
    arm_recs = {f"arm:{k}": ev.cache[p.key()] for k, p in arms.items()}
    plan_recs = {f"plan:{i}": r for i, r in enumerate(searched)}
    rows = {}
    for k, m in final.items():
        if k in cands:
            rows[k] = _row(k, m, task, lat[k], ref_ms, cands[k][2] / 1e6, cands[k][3])
        else:
            rec = arm_recs.get(k) or plan_recs[k]
            rows[k] = _row(k, m, task, lat[k], ref_ms, rec["file_mb"], "searched plan" if k in plan_recs else "uniform arm", rec)
            rows[k]["policy"] = rec["policy"]
    final_s = time.perf_counter() - t2
    held = [k for k in rows if k.startswith(("plan:", "arm:")) and rows[k]["latency_ratio"] <= BUDGET]
    answer = max(held, key=lambda k: (rows[k]["val_cosine"], -rows[k]["latency_ratio"])) if held else None
    peer_ok = [k for k in PEERS if k in rows and rows[k]["latency_ratio"] <= BUDGET]
    best_peer = max(peer_ok or [k for k in PEERS if k in rows],
                    key=lambda k: rows[k]["mean_cosine"] if peer_ok else rows[k]["speedup_vs_torch_fp32"])
    ans = rows.get(answer) if answer else None
    recipe = ts.to_recipe(ts.TransformerPolicy.from_dict(ans["policy"]), space, base) if ans else None
    verdict = _target_verdict({k: r for k, r in rows.items() if k not in ("torch_fp32", "ort_fp32", "openvino_fp32")})
    load_after = os.getloadavg()
    minilm = {
        "budget_latency_ratio": BUDGET, "answer": answer, "answer_row": ans, "answer_recipe": recipe,
        "budget_held": answer is not None,
        "best_peer": {"row": best_peer, "within_budget": bool(peer_ok), **rows[best_peer]},
        "answer_minus_best_peer_cosine": (ans["mean_cosine"] - rows[best_peer]["mean_cosine"]) if ans else None,
        "target_3x_at_0995": verdict, "rows": rows, "skipped_peers": skipped, "peer_versions": peers_openvino.versions(),
        "trials": {"asked": trials, "distinct_plans": len(ev.cache), "evaluations": len(ev.records),
                   "search_seconds": search_seconds, "cap_seconds": search_s, "records": records},
        "space": {"layers": [x.name for x in space.layers], "heads": space.heads[0], "ffn": space.ffn[0],
                  "ffn_multiple": space.ffn_multiple, "per_layer": space.per_layer, "groups": list(ts.GROUPS),
                  "choices": ts.CHOICES},
        "sizes": sizes, "search_timing": f"1 thread, every 4th test batch of 32 ({sum(int(b['input_ids'].shape[0]) for b in timing)} "
                                         "sentences), interleaved with fp32, 1 warmup + 5 repeats; kept for the final "
                                         f"timing: the {ev.keep} most faithful plans at <= {BUDGET} x (1 + {ev.margin})",
        "final_timing": f"1 thread, {sum(int(b['input_ids'].shape[0]) for b in batches)} test sentences (every other "
                        f"batch of 32), interleaved, 1 warmup + {3 if quick else 7} repeats",
        "seconds": {"search": search_seconds, "build_peers": build_peers_s, "final_timing_and_scoring": final_s,
                    "wall": time.perf_counter() - t_start},
        "contention": {"load_average_before": load_before, "load_average_after": load_after,
                       "final_timing_cpu_share": lat["torch_fp32"]["load"].get("cpu_share"),
                       "note": "2-core machine shared with other agents' jobs: ratios are interleaved medians; "
                               "cpu_share < 1 means another process held the core while timing"},
        "b2_plan_info": {"quantized_nodes": b2_info.get("quantized_nodes")}, "quick": quick,
        "machine": machine_facts(1),
    }
    return {"minilm_speedup_at_fidelity": ans["speedup_vs_torch_fp32"] if ans else None,
            "minilm_mean_cosine": ans["mean_cosine"] if ans else None,
            "minilm_top10": ans["top10_agreement"] if ans else None, "minilm": minilm}


def write(result: dict, path: Path | None = None) -> Path:
    """Update results/B9-<isa>.json's minilm keys (the rest of the file is kept), atomically."""
    from torchslim.core.isa import isa_slug
    from torchslim.core.utils import atomic_write_text, jsonable

    path = path or HERE / "results" / f"B9-{isa_slug()}.json"
    data = json.loads(path.read_text()) if path.exists() else {"id": ID, "title": TITLE}
    data.update(result)
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, default=float) + "\n")  # temp + os.replace
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="B9's MiniLM part (writes results/B9-<isa>.json's minilm keys)")
    ap.add_argument("--quick", action="store_true", help="small sentence sets, 4 trials (smoke run)")
    ap.add_argument("--out", help="write the JSON here instead of results/B9-<isa>.json (e.g. /tmp/b9m.json)")
    args = ap.parse_args()
    res = run(quick=args.quick, log=lambda s: print(s, flush=True))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
        print(f"wrote {args.out}")
    else:
        print(f"wrote {write(res)}")
    m = res["minilm"]
    v = m["target_3x_at_0995"]
    print(f"answer {m['answer']}: {res['minilm_speedup_at_fidelity']} x at cos {res['minilm_mean_cosine']}, "
          f"top-10 {res['minilm_top10']}; target met: {v['met']}; best peer {m['best_peer']['row']}")

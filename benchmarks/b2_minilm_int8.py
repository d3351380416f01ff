"""B2: all-MiniLM-L6-v2 int8 — speed vs fidelity, torchslim's plan next to its peers, one run.

Candidates (all encode the same length-sorted batches of 32 real English sentences from
Python standard-library docstrings, 2 threads):
- torch_fp32: PyTorch eager (SDPA attention), the 1.0x reference;
- ort_fp32: the fused ONNX graph (onnxruntime.transformers optimizer) in ONNX Runtime;
- ort_dynamic_default: ``quantize_dynamic`` with its defaults on the plain export;
- ort_per_channel: the same with ``per_channel=True``;
- torchao_int8: torchao Int8DynamicActivationInt8Weight, eager;
- openvino_fp32 / openvino_int8 (``peers_openvino.py``, needs ``torchslim[bench]``): the plain
  ONNX export through ``openvino.convert_model``, and that model quantized by NNCF post-training
  (``nncf.quantize``, ``model_type=TRANSFORMER``, calibrated on the same calibration sentences);
  CPU, f32 inference precision, ``INFERENCE_NUM_THREADS`` = the benchmark's threads. Without
  openvino (or if a build fails) they are listed under ``skipped_peers`` with the reason;
- torchslim: ``TORCHSLIM_PLAN`` (an ``OrtQuantConfig``), chosen on the val sentences: fused
  graph; per-channel int8 (QAttention / MatMulInteger, ORT's fastest int8 kernels) for Q/K/V,
  attention output and FFN input layers, with SmoothQuant (alpha 0.6, a per-channel Mul in the
  graph) on the Q/K/V and FFN-input activations, whose few outlier channels otherwise take the
  one per-tensor scale; the FFN output layers (inputs = GELU outputs, heavy tails; per-node
  sensitivity on val showed most of the per-channel plan's error there, and smoothing made them
  worse) as 8-bit weight blocks of 128 with per-block int8 activations (MatMulNBits); int8
  embedding table.
- torchslim_per_group_all: the previous plan, ``QuantConfig(mode="dynamic",
  granularity="per_group", group_size=128, backend="onnxruntime")`` (every MatMul in blocks):
  as faithful, but MatMulNBits is ~45% slower than MatMulInteger per layer here.
  (A mixed plan — per-channel int8 with the 8 most sensitive FFN layers kept float, found on val
  sentences — set ``B2_MIXED=1`` to add it as a row.)

Fidelity: mean cosine to the fp32 embeddings and top-10 nearest-neighbour agreement over the
test sentences. Latency: interleaved medians (compare_latency); the machine is shared. The
result's ``machine`` is ``torchslim.core.isa.machine_facts``: CPU, ISA (AVX2 / VNNI / AMX) and threads,
which decide every int8 peer's speed.

    python benchmarks/b2_minilm_int8.py --quick --out /tmp/B2_quick.json   # smoke run
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers_openvino

ID = "B2"
TITLE = "MiniLM-L6 int8: speedup vs PyTorch fp32 at fidelity (cosine, top-10), vs ORT/torchao peers"
HEADLINE = ["speedup_vs_torch_fp32", "mean_cosine", "top10_agreement", "file_mb", "ptq_seconds"]
MIN_COSINE_VAL = 0.998  # bound for the plan search on val; the test targets are 0.995 / 0.95
# Chosen on the 128 val sentences (never the test ones): val cos / top-10 for alpha 0.5, 0.6,
# 0.75 were 0.9983 / 0.949, 0.9985 / 0.955, 0.9985 / 0.950; per-channel everywhere 0.9928 / 0.910.
PLAN = {"block_bits": 8, "block_size": 128, "block_layers": ("*[0-9].output.dense",),  # FFN output
        "smooth_alpha": 0.6, "smooth_layers": ("*.attention.self.*", "*.intermediate.dense")}
ONE_THREAD = ("torch_fp32", "ort_fp32", "ort_per_channel", "openvino_fp32", "openvino_int8",
              "torchslim_per_group_all", "torchslim")
FP32_PEERS = ("torch_fp32", "ort_fp32", "openvino_fp32")  # fidelity 1.0 by construction


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _candidates(model, task, threads):
    """(name -> (model, seconds to build, file bytes, note), ORT plan info, skipped peers)."""
    import peers_openvino

    from torchslim.core.measure import state_dict_bytes
    from torchslim.quantization import ptq
    from torchslim.quantization.backends import (
        OrtQuantConfig,
        TorchaoConfig,
        ort_fp32,
        ort_quantize,
        saved_bytes,
        torchao_quantize,
    )
    from torchslim.quantization.config import QuantConfig

    ex = task.example_inputs()
    out = {"torch_fp32": (model, 0.0, state_dict_bytes(model), "PyTorch eager fp32")}
    f32, s = _timed(lambda: ort_fp32(model, ex))
    out["ort_fp32"] = (f32, s, f32.file_bytes, "fused graph, fp32")
    # the peers are ONNX Runtime's own defaults: full 8-bit weights (reduce_range=False) on every
    # CPU, though without VNNI their u8s8 products can saturate (torchslim warns once about it)
    for name, cfg in (("ort_dynamic_default", OrtQuantConfig(per_channel=False, optimize=False, reduce_range=False)),
                      ("ort_per_channel", OrtQuantConfig(per_channel=True, optimize=False, reduce_range=False))):
        res, s = _timed(lambda cfg=cfg: ort_quantize(model, ex, cfg, task))
        out[name] = (res.model, s, res.model.file_bytes, f"quantize_dynamic per_channel={cfg.per_channel}")
    (ao, _), s = _timed(lambda: torchao_quantize(model, TorchaoConfig(scheme="int8_dynamic")))
    out["torchao_int8"] = (ao, s, saved_bytes(ao), "Int8DynamicActivationInt8WeightConfig, eager")
    ov_peers, skipped = peers_openvino.build_peers(model, task, threads)
    out.update(ov_peers)
    if os.environ.get("B2_MIXED"):
        cfg = QuantConfig(mode="dynamic", granularity="per_channel", min_metric=MIN_COSINE_VAL,
                          batches=4, backend="onnxruntime")
        res, s = _timed(lambda: ptq.apply(model, cfg, task))
        floats = [d["layer"] for d in res.info["plan"] if d["bits"] == "float"]
        out["torchslim_mixed_per_channel"] = (res.model, s, res.model.file_bytes, f"plan keeps {len(floats)} layers float: {floats}")
    # blocks of 128 measured here: as faithful as 32 (cos 0.9985 vs 0.9987) and ~10% faster
    cfg = QuantConfig(mode="dynamic", granularity="per_group", group_size=128, backend="onnxruntime")
    res, s = _timed(lambda: ptq.apply(model, cfg, task))
    out["torchslim_per_group_all"] = (res.model, s, res.model.file_bytes, "every MatMul as 8-bit MatMulNBits (int8 compute) + QAttention + int8 embeddings")
    res, s = _timed(lambda: ort_quantize(model, ex, OrtQuantConfig(**PLAN), task))
    out["torchslim"] = (res.model, s, res.model.file_bytes, "per-channel int8 + SmoothQuant 0.6 (QKV, FFN in); FFN out 8-bit blocks of 128; int8 embeddings")
    return out, res.info, skipped


def _one_thread(cands: dict, batches: list, repeats: int) -> dict:
    """The ONE_THREAD candidates timed side by side with torch and ONNX Runtime at 1 thread."""
    from peers_openvino import OvModel

    from torchslim.core.measure import compare_latency
    from torchslim.core.task import call_model
    from torchslim.quantization.backends import OrtModel

    models = {k: cands[k][0] for k in ONE_THREAD if k in cands}
    models = {k: OrtModel(m.onnx_bytes, m.input_names, 1) if isinstance(m, OrtModel)
              else m.with_threads(1) if isinstance(m, OvModel) else m for k, m in models.items()}
    runners = {k: (lambda m=m: [call_model(m, b) for b in batches]) for k, m in models.items()}
    return compare_latency(runners, warmup=1, repeats=repeats, threads=1)


def run(quick: bool = False) -> dict:
    import peers_openvino
    import torch

    from torchslim.core.isa import machine_facts
    from torchslim.core.measure import compare_latency
    from torchslim.core.task import call_model
    from torchslim.zoo.minilm import load_minilm, minilm_task

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    n_test = 512 if not quick else 256
    task = minilm_task(n_sentences=n_test, calib_sentences=128, val_sentences=128, batch_size=32)
    model = load_minilm()
    threads = torch.get_num_threads()
    cands, info, skipped = _candidates(model, task, threads)
    fidelity = {k: task.evaluate_all(m) for k, (m, *_rest) in cands.items()}
    batches = [b for i, (b, _) in enumerate(task.test) if i % 2 == 0]  # every other batch: all lengths
    runners = {k: (lambda m=m: [call_model(m, b) for b in batches]) for k, (m, *_rest) in cands.items()}
    load_before = os.getloadavg()[0]
    # A candidate more than 10x slower than fp32 (torchao's eager int8 on x86 without VNNI:
    # ~0.05x) would take most of the run if timed in every repeat; it is timed in its own short
    # interleaved run against torch_fp32 (3 repeats) instead, and the row says so.
    probe = compare_latency(runners, warmup=0, repeats=1)
    slow = [k for k in runners if probe[k]["median_ms"] > 10 * probe["torch_fp32"]["median_ms"]]
    lat = compare_latency({k: f for k, f in runners.items() if k not in slow}, warmup=1, repeats=5 if quick else 15)
    for k in slow:
        pair = compare_latency({"torch_fp32": runners["torch_fp32"], k: runners[k]}, warmup=0, repeats=3)
        scale = lat["torch_fp32"]["median_ms"] / pair["torch_fp32"]["median_ms"]
        lat[k] = {key: v * scale if key.endswith("_ms") else v for key, v in pair[k].items()}
        cands[k] = (*cands[k][:3], cands[k][3] + "; >10x slower than fp32 here, timed in a separate 3-repeat "
                    "interleaved run against torch_fp32 (scaled to the main run's fp32 median)")
    lat1 = _one_thread(cands, batches, 5 if quick else 11)
    load_after = os.getloadavg()[0]
    ref_ms = lat["torch_fp32"]["median_ms"]
    rows = {}
    for k, (m, secs, nbytes, note) in cands.items():
        rows[k] = {
            "speedup_vs_torch_fp32": ref_ms / lat[k]["median_ms"],
            "mean_cosine": fidelity[k]["mean_cosine"],
            "top10_agreement": fidelity[k]["top10_agreement"],
            "file_mb": nbytes / 1e6,
            "ptq_seconds": secs,
            "median_ms": lat[k]["median_ms"],
            "p10_ms": lat[k]["p10_ms"],
            "p90_ms": lat[k]["p90_ms"],
            "note": note,
        }
        if k in lat1:
            rows[k]["speedup_vs_torch_fp32_1thread"] = lat1["torch_fp32"]["median_ms"] / lat1[k]["median_ms"]
            rows[k]["median_ms_1thread"] = lat1[k]["median_ms"]
    ours = rows.pop("torchslim")
    behind = [f"{metric}: {peer} {rows[peer][metric]:.4g} vs ours {ours[metric]:.4g}"
              for peer in rows if peer != "torch_fp32"
              for metric in ("speedup_vs_torch_fp32",) + (() if peer in FP32_PEERS else ("mean_cosine", "top10_agreement"))
              if rows[peer][metric] > ours[metric]]
    behind += [f"file_mb: {peer} {rows[peer]['file_mb']:.4g} vs ours {ours['file_mb']:.4g}"
               for peer in rows if rows[peer]["file_mb"] < ours["file_mb"]]
    return {
        **{k: ours[k] for k in HEADLINE},
        "ours": ours,
        "peers": rows,
        "skipped_peers": skipped,
        "peer_versions": peers_openvino.versions(),
        "targets": {"speedup_vs_torch_fp32": 2.0, "speedup_stretch": 3.0, "mean_cosine": 0.995,
                    "top10_agreement": 0.95, "ptq_seconds": 60, "file_mb": 20},
        "where_ours_is_behind": behind,
        "speedup_vs_torch_fp32_1thread": ours["speedup_vs_torch_fp32_1thread"],
        "plan": {**PLAN, "block_nodes": info.get("block_nodes"), "smoothed_nodes_max_scale": info.get("smoothed_nodes")},
        "quantized_nodes": info.get("quantized_nodes"),
        "ort_fused_ops": info.get("fused_ops"),
        "test_sentences": n_test,
        "calibration_sentences": 128,
        "val_sentences": 128,
        "batch_size": 32,
        "timed_sentences": sum(int(b["input_ids"].shape[0]) for b in batches),
        "threads": threads,
        "machine": machine_facts(threads),
        "quick": quick,
        "seed": 0,
        "load_average_before_after": [load_before, load_after],
        "notes": "2-core machine shared with other engineers' jobs: latencies are interleaved medians "
                 "(compare_latency), ratios only; ptq_seconds are wall times under that load. Headline at "
                 "2 threads; *_1thread figures are a second interleaved run with every runtime at 1 thread. "
                 "PyTorch eager suffers more than ONNX Runtime when another job takes a core, so a high "
                 "load average inflates the speedups: read them with load_average_before_after. "
                 "OpenVINO pins its threads to cores by default (ENABLE_CPU_PINNING), the others do not.",
    }


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="B2 on its own (benchmarks/run.py B2 writes results/B2-<isa>.json)")
    ap.add_argument("--quick", action="store_true", help="256 test sentences, 5 repeats (smoke run)")
    ap.add_argument("--out", help="write the JSON here instead of printing it (e.g. /tmp/B2_quick.json)")
    args = ap.parse_args()
    start = time.perf_counter()
    text = json.dumps({**run(quick=args.quick), "wall_seconds": round(time.perf_counter() - start, 2)},
                      indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)

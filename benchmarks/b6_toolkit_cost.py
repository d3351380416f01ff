"""B6: the toolkit's own cost — `torchslim demo` wall time (cold: trains the baseline; warm:
baseline cached), its peak RSS, and the wall time of post-training quantization of MiniLM."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

ID = "B6"
TITLE = "toolkit cost: demo wall time, peak RSS, MiniLM PTQ time"
HEADLINE = ["demo_seconds", "demo_warm_seconds", "peak_rss_gb", "ptq_minilm_seconds"]


def _timed_demo(cache: str, out: str, retrain: bool) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "torchslim.app.cli", "demo", "--out", out, "--cache-dir", cache]
    if retrain:
        cmd.append("--retrain")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"demo failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over finished children
    return seconds, rss_kb, proc.stdout


def _ptq_minilm_seconds() -> tuple[float, dict]:
    """Wall time of torchslim.quantize on the bundled MiniLM with B2's configuration
    (calibration, simulation, ONNX export, graph fusion, ORT int8 conversion), model and task
    already loaded."""
    from torchslim.quantization import QuantConfig, quantize
    from torchslim.zoo import build_model, build_task

    task = build_task("minilm", n_sentences=512)
    model = build_model("minilm", task)
    cfg = QuantConfig(mode="dynamic", granularity="per_group", group_size=128, backend="onnxruntime")
    start = time.perf_counter()
    result = quantize(model, cfg, task)
    seconds = time.perf_counter() - start
    return seconds, task.evaluate_all(result.model)


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cold, rss_cold, out_text = _timed_demo(f"{tmp}/cache", f"{tmp}/out", retrain=True)
        warm, rss_warm, _ = _timed_demo(f"{tmp}/cache", f"{tmp}/out2", retrain=False)
    ptq, fidelity = (None, {}) if quick else _ptq_minilm_seconds()
    return {
        "demo_seconds": round(cold, 2),
        "demo_warm_seconds": round(warm, 2),
        "peak_rss_gb": round(max(rss_cold, rss_warm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20, 3),
        "demo_peak_rss_gb": round(max(rss_cold, rss_warm) / 2**20, 3),
        "ptq_process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "ptq_minilm_seconds": None if ptq is None else round(ptq, 2),
        "ptq_minilm_fidelity": fidelity,
        "targets": {"demo_seconds": 180, "peak_rss_gb": 3, "ptq_minilm_seconds": 60},
        "demo_table": out_text.strip().splitlines()[-12:],
    }

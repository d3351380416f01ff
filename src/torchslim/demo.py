"""``torchslim demo``: the main job on the embedded default (LeNet-300-100 on sklearn digits).

The trained baseline is cached (safetensors, keyed by the training config) so a second demo
skips training. Every row is measured with ``measure`` and written to ``out/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from .export.weights import load_weights, save_weights
from .train import TrainConfig, fit
from .utils import atomic_write_text, seed_everything
from .zoo import build_model, build_task

# Chosen by a sweep over optimizers/schedules on the val split (see README "Demo").
BASELINE_TRAIN = dict(epochs=60, lr=1e-3, optimizer="Adam", scheduler="CosineAnnealingLR")


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("TORCHSLIM_CACHE", Path.home() / ".cache" / "torchslim"))


def trained_baseline(task, seed: int, cache_dir: str | None, retrain: bool, console: Console):
    """LeNet-300-100 trained on task, from the cache when the same config was trained before."""
    cfg = TrainConfig(seed=seed, progress=console.is_terminal, **BASELINE_TRAIN)
    key = hashlib.sha256(json.dumps({"model": "lenet300", "task": task.name, **asdict(cfg), "progress": None},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / f"demo-lenet300-{task.name}-{key}.safetensors"
    seed_everything(seed)
    model = build_model("lenet300", task)
    if path.exists() and not retrain:
        console.print(f"baseline: loaded from cache {path}")
        return load_weights(model, path)
    console.print(f"baseline: training LeNet-300-100 on {task.name} ({cfg.epochs} epochs, {cfg.optimizer}, {cfg.scheduler})")
    fit(model, task, cfg)
    save_weights(model, path)
    return model


def run_demo(out: str = "out", cache_dir: str | None = None, retrain: bool = False,
             threads: int | None = None, seed: int = 0) -> list:
    from .measure import MeasureConfig, format_records, measure

    console = Console()
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    task = build_task("digits", batch_size=32, seed=seed)
    model = trained_baseline(task, seed, cache_dir, retrain, console)
    out_dir = Path(out)
    model_path = save_weights(model, out_dir / "baseline.safetensors")
    records = [measure(model, task, MeasureConfig(batch_size=256, threads=threads), saved_path=model_path, stage="baseline")]
    console.print(format_records(records))
    summary = {"records": [r.to_dict() for r in records], "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_text(out_dir / "run.json", json.dumps(summary, indent=2))
    console.print(f"wrote {out_dir}/ (baseline.safetensors, run.json) in {summary['seconds']} s")
    return records

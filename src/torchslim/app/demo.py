"""``torchslim demo``: the main job on the embedded default (LeNet-300-100 on sklearn digits).

The trained baseline is cached (safetensors, keyed by its training config) so a second demo
skips training; then the default recipe runs through the same runner as ``torchslim run``
and every row is measured and written to ``out/`` (run.json, artifacts, report.html).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.train import TrainConfig, fit
from ..core.utils import console, seed_everything
from ..export.weights import load_weights, save_weights
from ..zoo import build_model, build_task

# Chosen by a sweep over optimizers/schedules on the val split (see README "Demo").
BASELINE_TRAIN = {"epochs": 60, "lr": 1e-3, "optimizer": "Adam", "scheduler": "CosineAnnealingLR"}
TASK_KWARGS = {"batch_size": 32}


def default_recipe(weights: str, seed: int, threads: int | None) -> dict[str, Any]:
    """The default compression recipe for the demo (stages are added as techniques land)."""
    return {
        "name": "torchslim demo: LeNet-300-100 on digits",
        "task": {"name": "digits", "kwargs": {**TASK_KWARGS, "seed": seed}},
        "model": {"name": "lenet300", "weights": weights},
        "seed": seed,
        "stages": DEFAULT_STAGES,
        "export": ["archive"],
        # one thread unless asked: on a shared 2-core machine, 2 OpenMP threads wait on each
        # other whenever another process holds a core, and latency ratios become noise
        "measure": {"batch_size": 256, "threads": threads or 1, "repeats": 30},
    }


# Deep-Compression style: gradual magnitude pruning to 92% zeros with fine-tuning, then 4/3/4-bit
# shared weights (k-means, linear init) with centroid fine-tuning; the share stage's bytes are
# those of the entropy-coded archive (benchmark B1 measures the same pipeline over 3 seeds).
DEFAULT_STAGES: list[dict[str, Any]] = [
    {"prune": {"sparsity": 0.92, "schedule": "gradual", "scope": "global",
               "finetune": {"epochs": 30, "lr": 1e-3}}},
    {"share": {"bits": {"net.1": 4, "net.3": 3, "net.5": 4}, "init": "linear", "fp16_floats": True,
               "finetune": {"epochs": 8, "lr": 1e-3}}},
]


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("TORCHSLIM_CACHE", Path.home() / ".cache" / "torchslim"))


def trained_baseline(seed: int, cache_dir: str | None, retrain: bool, con) -> Path:
    """Path of LeNet-300-100 trained on digits, training it unless the same config is cached."""
    task = build_task("digits", seed=seed, **TASK_KWARGS)
    cfg = TrainConfig(seed=seed, progress=None, **BASELINE_TRAIN)  # auto: bars in a terminal
    key_src = {"model": "lenet300", "task": task.name, **TASK_KWARGS, **asdict(cfg), "progress": None}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / f"demo-lenet300-{task.name}-{key}.safetensors"
    if path.exists() and not retrain:
        try:
            load_weights(build_model("lenet300", task), path)
            con.print(f"baseline: loaded from cache {path}", markup=False)
            return path
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is simply retrained
            con.print(f"baseline: cache entry unusable ({type(exc).__name__}); retraining", markup=False)
    con.print(f"baseline: training LeNet-300-100 on digits ({cfg.epochs} epochs, {cfg.optimizer}, {cfg.scheduler})")
    seed_everything(seed)
    model = build_model("lenet300", task)
    fit(model, task, cfg)
    return save_weights(model, path)


def run_demo(out: str = "out", cache_dir: str | None = None, retrain: bool = False,
             threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    from ..core.measure import Record, format_records
    from .report import write_report
    from .runner import run_recipe

    con = console()
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    weights = trained_baseline(seed, cache_dir, retrain, con)
    summary = run_recipe(default_recipe(str(weights), seed, threads), out=out,
                         log=lambda m: con.print(m, markup=False))
    con.print(format_records([Record.from_dict(r) for r in summary["rows"]]))
    report = write_report(Path(out) / "run.json")
    con.print(f"wrote {out}/ (run.json, artifacts/, {report.name}) in {time.perf_counter() - start:.1f} s", markup=False)
    return summary

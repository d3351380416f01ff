"""B4: knowledge distillation on MNIST-1D (Hinton et al. 2015 closed ≈91% of the gap on MNIST).

1. Distillation: a residual CNN teacher (width 32, 2 stages, 11x the student's parameters) vs a
   student of width 12, 1 stage (smaller students have fewer pooled features than classes, and
   wider ones leave a gap under 1 pt, too small to measure on 4,000 test signals); the student is
   trained alone and distilled with the same budget (epochs, optimizer, schedule, data) on 3
   seeds. gap_closed = (distilled - alone) / (teacher - alone), from the seed means. One teacher
   (seed 0) serves all student seeds.
1b. The same with a transfer set (Hinton et al.'s setting): the distilled student sees the
   labeled train inputs plus 3x as many freshly generated unlabeled MNIST-1D inputs, soft loss
   only, for the same number of optimizer steps (+-1%). Reported apart: it uses more inputs.
2. Distillation as recovery: the teacher structurally pruned to 50% of its MACs
   (torchslim.prune.structured), then plain fine-tuning vs distillation from the unpruned
   teacher at the same budget, 3 seeds.
3. Low-rank latency: a 1024x1024 Linear factorized to half its MACs, timed side by side.

Training runs on 1 torch thread: the 2 shared cores were oversubscribed and 2 threads ran slower.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from torchslim.distill import DistillConfig
from torchslim.distill import apply as distill
from torchslim.lowrank import LowRankConfig, factorize_layers
from torchslim.measure import compare_latency, count_macs
from torchslim.train import TrainConfig, fit
from torchslim.zoo import build_model, build_task

ID = "B4"
TITLE = "Distillation on MNIST-1D: share of the teacher-student gap closed"
HEADLINE = ["gap_closed", "teacher_acc", "student_alone_acc", "student_distilled_acc", "seeds"]

TEACHER = {"width": 32, "blocks": 2}
STUDENT = {"width": 12, "blocks": 1}
TEMPERATURE, ALPHA = 4.0, 0.9  # Hinton-style soft-dominated mix, fixed for the headline
ALT = {"temperature": 1.0, "alpha": 0.5}  # the best of a small one-seed exploration, reported apart


def _train_cfg(epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=3e-3, scheduler="CosineAnnealingLR", seed=seed, device="cpu")


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _student(task, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("rescnn1d", task, **STUDENT)


def distillation(task, teacher: nn.Module, seeds: list[int], epochs: int, cfg: dict[str, float]) -> dict[str, Any]:
    """Student alone vs distilled, same budget, per seed."""
    alone, distilled, alt = [], [], []
    for seed in seeds:
        s = _student(task, seed)
        fit(s, task, _train_cfg(epochs, seed))
        alone.append(task.evaluate(s))
        for kd, accs in ((cfg, distilled), (ALT, alt)):
            s = _student(task, seed)
            distill(s, DistillConfig(teacher=teacher, train=_train_cfg(epochs, seed), **kd), task)
            accs.append(task.evaluate(s))
        print(f"  seed {seed}: alone {alone[-1]:.4f} distilled {distilled[-1]:.4f} alt {alt[-1]:.4f}", flush=True)
    return {"alone": alone, "distilled": distilled, "alt": alt}


def transfer_set(task, n_extra: int, seed: int = 7):
    """Train inputs + n_extra fresh MNIST-1D inputs (generator seed 7, not the task's 42), unlabeled."""
    import dataclasses

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset
    from torch.utils.data import DataLoader, TensorDataset

    args = get_dataset_args()
    args.num_samples, args.seed = int(n_extra / 0.8) + 1, seed
    data = make_dataset(args)
    extra = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:n_extra]
    x = torch.cat([task.train.dataset.tensors[0], torch.as_tensor(extra)])
    placeholder = torch.full((len(x),), -1)  # never read in unlabeled mode
    loader = DataLoader(TensorDataset(x, placeholder), batch_size=task.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return dataclasses.replace(task, train=loader)


def distill_transfer(task, teacher: nn.Module, seeds: list[int], epochs: int, temperature: float) -> dict[str, Any]:
    """Unlabeled distillation on a 4x transfer set for epochs/4 epochs (the same step count)."""
    utask = transfer_set(task, 3 * len(task.train.dataset))
    accs, steps = [], 0
    for seed in seeds:
        s = _student(task, seed)
        cfg = DistillConfig(teacher=teacher, temperature=temperature, unlabeled=True, train=_train_cfg(epochs // 4, seed))
        steps = distill(s, cfg, utask).info["fit"]["steps"]
        accs.append(task.evaluate(s))
        print(f"  seed {seed}: transfer-set distilled {accs[-1]:.4f}", flush=True)
    return {"acc": accs, "acc_mean": statistics.mean(accs), "temperature": temperature,
            "inputs": len(utask.train.dataset), "steps": steps, "steps_alone": epochs * len(task.train)}


def recovery(task, teacher: nn.Module, seeds: list[int], epochs: int) -> dict[str, Any]:
    """50%-MACs structured pruning of the teacher, then fine-tune vs distill (same budget)."""
    try:
        from torchslim.prune.structured import StructuredPruneConfig, prune_structured
    except ImportError as exc:  # the colleague's module is not there
        return {"skipped": f"torchslim.prune.structured unavailable: {exc}"}
    pruned, info = prune_structured(teacher, StructuredPruneConfig(macs_keep=0.5, criterion="l2"), task)
    out: dict[str, Any] = {"macs_ratio": info["macs_ratio"], "params_before": info["params_before"],
                           "params_after": info["params_after"], "acc_pruned_no_training": task.evaluate(pruned),
                           "finetune": [], "distill": [], "epochs": epochs}
    for seed in seeds:
        m = copy.deepcopy(pruned)
        fit(m, task, _train_cfg(epochs, seed))
        out["finetune"].append(task.evaluate(m))
        m = copy.deepcopy(pruned)
        distill(m, DistillConfig(teacher=teacher, temperature=TEMPERATURE, alpha=ALPHA, train=_train_cfg(epochs, seed)), task)
        out["distill"].append(task.evaluate(m))
        print(f"  recovery seed {seed}: finetune {out['finetune'][-1]:.4f} distill {out['distill'][-1]:.4f}", flush=True)
    out["finetune_mean"] = statistics.mean(out["finetune"])
    out["distill_mean"] = statistics.mean(out["distill"])
    out["distill_minus_finetune_pt"] = 100 * (out["distill_mean"] - out["finetune_mean"])
    return out


def lowrank_latency(repeats: int) -> dict[str, Any]:
    """One 1024x1024 Linear vs its half-MACs SVD factorization, batch 64, timed interleaved."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(1024, 1024)).eval()
    x = torch.randn(64, 1024)
    low = copy.deepcopy(dense)
    rec = factorize_layers(low, LowRankConfig(ratio=0.5), x)[0]
    with torch.inference_mode():
        rel_out_err = ((low(x) - dense(x)).norm() / dense(x).norm()).item()
    lat = compare_latency({"dense": lambda: dense(x), "lowrank": lambda: low(x)}, warmup=5, repeats=repeats, threads=1)
    return {"rank": rec["rank"], "macs_dense": count_macs(dense, x), "macs_lowrank": count_macs(low, x),
            "rel_fro_error_weight": rec["rel_fro_error"], "rel_output_error_random_weights": rel_out_err,
            "median_ms": {k: v["median_ms"] for k, v in lat.items()},
            "speedup": lat["dense"]["median_ms"] / lat["lowrank"]["median_ms"], "batch": 64, "threads": 1}


def run(quick: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    seeds = [0] if quick else [0, 1, 2]
    epochs, rec_epochs = (4, 1) if quick else (12, 2)
    task = build_task("mnist1d", num_samples=20000, batch_size=256, seed=0)
    torch.manual_seed(0)
    teacher = build_model("rescnn1d", task, **TEACHER)
    fit(teacher, task, _train_cfg(epochs, 0))
    teacher_acc = task.evaluate(teacher)
    print(f"  teacher {teacher_acc:.4f}", flush=True)
    kd_cfg = {"temperature": TEMPERATURE, "alpha": ALPHA}
    d = distillation(task, teacher, seeds, epochs, kd_cfg)
    alone, dist = statistics.mean(d["alone"]), statistics.mean(d["distilled"])
    gap = teacher_acc - alone
    result: dict[str, Any] = {
        "gap_closed": (dist - alone) / gap if gap > 0 else float("nan"),
        "teacher_acc": teacher_acc, "student_alone_acc": alone, "student_distilled_acc": dist, "seeds": len(seeds),
        "per_seed": {"seeds": seeds, "student_alone_acc": d["alone"], "student_distilled_acc": d["distilled"]},
        "spread": {"alone_stdev": statistics.pstdev(d["alone"]), "distilled_stdev": statistics.pstdev(d["distilled"])},
        "gap_pt": 100 * gap,
        "teacher": {"arch": "rescnn1d", **TEACHER, "params": _params(teacher),
                    "macs_per_sample": count_macs(teacher, task.example_inputs(1))},
        "student": {"arch": "rescnn1d", **STUDENT, "params": _params(_student(task, 0)),
                    "macs_per_sample": count_macs(_student(task, 0), task.example_inputs(1))},
        "budget": {"epochs": epochs, "optimizer": "Adam", "lr": 3e-3, "scheduler": "CosineAnnealingLR", "batch_size": 256},
        "distill_config": kd_cfg,
        "dataset": {"name": "mnist1d", "num_samples": 20000, "train": len(task.train.dataset),
                    "val": len(task.val.dataset), "test": len(task.test.dataset)},
    }
    result["alt_config"] = {**ALT, "student_distilled_acc": d["alt"], "mean": statistics.mean(d["alt"]),
                            "gap_closed": (statistics.mean(d["alt"]) - alone) / gap if gap > 0 else float("nan")}
    tr = distill_transfer(task, teacher, seeds, epochs, TEMPERATURE)
    tr["gap_closed"] = (tr["acc_mean"] - alone) / gap if gap > 0 else float("nan")
    result["transfer_set"] = tr
    result["recovery"] = recovery(task, teacher, seeds, rec_epochs)
    result["lowrank_latency"] = lowrank_latency(repeats=10 if quick else 40)
    result["teacher_soft_targets"] = soft_target_stats(task, teacher)
    result["notes"] = (f"2-core machine shared with other engineers (1-min load average {os.getloadavg()[0]:.1f} at "
                       "the end): training on 1 torch thread; latency ratios only, interleaved, medians. One "
                       f"teacher (seed 0) for all student seeds. Run took {time.perf_counter() - start:.0f} s.")
    result["findings"] = FINDINGS
    return result


FINDINGS = (
    "Distillation did not close the gap here. The student is capacity-limited, not data-limited: at T=4 "
    "the teacher's train targets are soft (mean max prob ~0.64, see teacher_soft_targets) and a 12-channel "
    "student cannot match the 10-way distribution, so the soft-dominated loss (alpha 0.9) costs accuracy; "
    "T=1, alpha=0.5 is neutral (alt_config). A 4x unlabeled transfer set did not help either. One-seed "
    "development runs (12-15 epochs) agreed: students of width 8/10/12/16 and MLPs (64), (128,128), "
    "(256,256) were never helped by more than 0.6 pt (MLP 256x256: alone 74.0%, distilled 70.3%, "
    "transfer set 74.6%), and width 16 alone was already within 0.6 pt of the teacher (too small a gap).")


def soft_target_stats(task, teacher: nn.Module) -> dict[str, float]:
    """How soft the teacher's train targets are at each temperature (mean max probability)."""
    out, _ = task.outputs_and_targets(teacher, "train")
    return {f"T={t:g}": (out / t).softmax(-1).max(-1).values.mean().item() for t in (1.0, 2.0, 4.0)}


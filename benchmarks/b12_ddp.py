"""B12: DDP under torchrun (gloo, CPU), 1 vs 2 processes, on a gradual-pruning fine-tune.

rescnn1d (width 64, BatchNorm, residual) on MNIST-1D: a dense model is trained once (in this
process, saved), then every launch loads it and runs ``torchslim.prune`` with the gradual
(cubic) schedule to 80% zeros and its fine-tune, the pruning masks moving during training.
Configurations, launched interleaved (1, 2, 3, 1, 2, 3, ...) so that machine load hits them
alike: one process with 1 thread, one process with 2 threads (the same cores as two ranks) and
``torchrun --nproc_per_node 2`` with 1 thread per rank. Global batch 128 in every case (per
rank 64; ``torchslim.core.distributed``), same lr. Throughput = training samples processed / wall
seconds of the fine-tune (validation each epoch included; process start-up excluded), median
over rounds. Accuracy after the fine-tune and the masks are compared between 1 and 2 processes;
masks are compared across the two ranks by digest.

Run: ``python benchmarks/b12_ddp.py`` (or ``python benchmarks/run.py B12``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ID = "B12"
TITLE = "DDP under torchrun (gloo, CPU): 1 vs 2 processes, gradual-pruning fine-tune of rescnn1d/MNIST-1D"
HEADLINE = ["ddp_metric_delta_pt", "masks_identical", "throughput_ratio_2proc", "throughput_ratio_vs_1proc_2threads"]
CONFIGS = {"1proc_1thread": (1, 1), "1proc_2threads": (1, 2), "2proc_1thread": (2, 1)}


def _task(quick: bool):
    from torchslim.zoo import build_task

    return build_task("mnist1d", num_samples=4000 if quick else 10000, batch_size=128, seed=0)


def worker(weights: str, quick: str, threads: str, out: str) -> None:
    """One launch (inside torchrun or alone): gradual pruning + fine-tune, timed."""
    import torchslim
    from torchslim.core import distributed
    from torchslim.core.train import TrainConfig
    from torchslim.export.weights import load_weights
    from torchslim.pruning import PruneConfig
    from torchslim.pruning.masks import masks_of
    from torchslim.zoo import build_model

    distributed.init_from_env()
    torch.set_num_threads(int(threads))
    task = _task(quick == "1")
    model = build_model("rescnn1d", task)
    load_weights(model, weights)
    epochs = 2 if quick == "1" else 4
    cfg = PruneConfig(sparsity=0.8, schedule="gradual", gradual_updates=10,
                      finetune=TrainConfig(epochs=epochs, lr=0.002, seed=0, device="cpu"))
    distributed.barrier()
    start = time.perf_counter()
    pruned = torchslim.prune(model, cfg, task).model
    seconds = time.perf_counter() - start
    masks = masks_of(pruned)
    mask_digest = distributed.digest(_MaskHolder(masks))
    digests = [mask_digest]
    if distributed.active():
        digests = [None] * distributed.world_size()
        torch.distributed.all_gather_object(digests, mask_digest)
    if distributed.is_main():
        samples = epochs * len(task.train.dataset)
        torch.save({k: v.cpu() for k, v in masks.items()}, out + ".masks.pt")
        Path(out).write_text(json.dumps({
            "seconds": seconds, "samples": samples, "samples_per_s": samples / seconds,
            "test_accuracy": task.evaluate(pruned), "mask_digests": digests,
            "sparsity": 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
            "world": distributed.world_size(), "threads": torch.get_num_threads()}))
    distributed.teardown()


class _MaskHolder(torch.nn.Module):
    """The masks as buffers, so ``distributed.digest`` hashes exactly them."""

    def __init__(self, masks):
        super().__init__()
        for i, (_, m) in enumerate(sorted(masks.items())):
            self.register_buffer(f"m{i}", m)


def _launch(nproc: int, threads: int, weights: Path, quick: bool, out: Path) -> dict:
    script = str(Path(__file__).resolve())
    args = ["--worker", str(weights), "1" if quick else "0", str(threads), str(out)]
    cmd = ([sys.executable, script, *args] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"B12 launch {nproc}x{threads} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {**json.loads(out.read_text()), "loadavg_1min_before": load}


def run(quick: bool = False) -> dict:
    from torchslim.core.train import TrainConfig, fit
    from torchslim.export.weights import save_weights
    from torchslim.zoo import build_model

    rounds = 2 if quick else 3
    task = _task(quick)
    torch.manual_seed(0)
    dense = build_model("rescnn1d", task)
    fit(dense, task, TrainConfig(epochs=2 if quick else 4, lr=0.003, seed=0, device="cpu"))
    runs: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_weights(dense, Path(tmp) / "dense.safetensors")
        masks = {}
        for r in range(rounds):
            for name, (nproc, threads) in CONFIGS.items():
                out = Path(tmp) / f"{name}-{r}.json"
                runs[name].append(_launch(nproc, threads, weights, quick, out))
                masks.setdefault(name, torch.load(str(out) + ".masks.pt", weights_only=True))
    med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    spread = {k: max(x["samples_per_s"] for x in v) / min(x["samples_per_s"] for x in v) for k, v in runs.items()}
    one, two = runs["1proc_1thread"][0], runs["2proc_1thread"][0]
    agree = sum(int((masks["1proc_1thread"][k] == masks["2proc_1thread"][k]).sum()) for k in masks["1proc_1thread"])
    total = sum(m.numel() for m in masks["1proc_1thread"].values())
    cores = os.cpu_count()
    warnings = [f"{k}: throughput spread {s:.2f}x between rounds (machine load varied)" for k, s in spread.items()
                if s > 1.2]
    loads = [x["loadavg_1min_before"] for v in runs.values() for x in v]
    if max(loads) > 0.5 * cores:
        warnings.append(f"1-min load average up to {max(loads):.1f} on {cores} cores before launches: "
                        "other processes competed for the CPU; ratios are of medians of interleaved rounds")
    return {
        "ddp_metric_delta_pt": 100 * (two["test_accuracy"] - one["test_accuracy"]),
        "masks_identical": all(len(set(x["mask_digests"])) == 1 for x in runs["2proc_1thread"]),
        "throughput_ratio_2proc": med["2proc_1thread"] / med["1proc_1thread"],
        "throughput_ratio_vs_1proc_2threads": med["2proc_1thread"] / med["1proc_2threads"],
        "mask_agreement_1proc_vs_2proc": agree / total,
        "test_accuracy": {"1proc": one["test_accuracy"], "2proc": two["test_accuracy"]},
        "test_samples": len(task.test.dataset), "train_samples": len(task.train.dataset),
        "samples_per_s_median": med, "spread_max_over_min": spread, "runs": runs, "rounds": rounds,
        "global_batch": 128, "per_rank_batch_2proc": 64, "sparsity": two["sparsity"],
        "cores": cores, "backend": "gloo", "threads": 1,
        "gpu": None, "gpu_note": "no GPU was lent to this task: no NCCL/GPU figures",
        "warnings": warnings,
        "notes": (f"{cores}-core machine shared with other jobs. Two ranks on {cores} cores compete with each "
                  "other and with gloo's communication threads; a 1-process run with 2 threads uses the same "
                  "cores. Per-epoch validation is done by every rank (not split)."),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:])
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).with_name("run.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        raise SystemExit(bench.main(["B12", *sys.argv[1:]]))

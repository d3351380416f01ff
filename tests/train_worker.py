"""Subprocess worker for the kill-and-resume test: trains LeNet-300-100 on digits with
per-epoch checkpoints and writes the final weights. SLOW_STEP_S makes every step sleep so the
parent can kill the run mid-way (sleeping does not change the numbers)."""

import os
import sys
import time

import torch

from torchslim.core.train import TrainConfig, fit
from torchslim.export.weights import save_weights
from torchslim.zoo import build_model, build_task


class Slow:
    def after_step(self, model, step):
        time.sleep(float(os.environ.get("SLOW_STEP_S", "0")))


def main(ckpt_dir: str, out: str, resume: str) -> None:
    torch.set_num_threads(1)
    task = build_task("digits", batch_size=64, seed=3)
    torch.manual_seed(3)
    model = build_model("lenet300", task)
    cfg = TrainConfig(epochs=6, lr=0.05, optimizer="SGD", optimizer_kwargs={"momentum": 0.9},
                      scheduler="StepLR", scheduler_kwargs={"step_size": 2, "gamma": 0.5},
                      seed=3, device="cpu", checkpoint_dir=ckpt_dir, resume=resume == "1")
    result = fit(model, task, cfg, hooks=[Slow()])
    save_weights(model, out)
    print("resumed_from", result.resumed_from_epoch, flush=True)


if __name__ == "__main__" and sys.argv[1:2] != ["ddp"]:
    main(*sys.argv[1:])


# ---------------------------------------------------------------- torchrun worker (test_distributed)
# python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_worker.py ddp RECIPE OUT SPY KILL RESUME
# Runs the recipe on every rank; KILL names a stage at whose start rank 1 SIGKILLs itself (fault
# injection for --resume); without KILL/RESUME it then runs gradual pruning through the Python
# API under DDP and each rank writes its own masks to SPY (outside OUT), for the test to compare.

DDP_TRAIN = {"epochs": 2, "lr": 0.05, "optimizer": "SGD", "optimizer_kwargs": {"momentum": 0.9}, "seed": 0,
             "device": "cpu"}


def gradual_prune_digits():
    """Gradual magnitude pruning (masks recomputed by the schedule during fit) of LeNet-300-100."""
    import torchslim
    from torchslim.pruning import PruneConfig

    task = build_task("digits", batch_size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("lenet300", task)
    seen = []  # the targets this process trained on (to show that ranks split the batches)
    loss = task.loss

    def counting_loss(outputs, targets):
        seen.append(targets.clone())
        return loss(outputs, targets)

    task.loss = counting_loss
    fit(model, task, TrainConfig(**DDP_TRAIN))
    cfg = PruneConfig(sparsity=0.9, schedule="gradual", gradual_updates=5,
                      finetune=TrainConfig(**{**DDP_TRAIN, "epochs": 2, "lr": 0.02}))
    pruned = torchslim.prune(model, cfg, task).model
    return pruned, task.evaluate(pruned), torch.cat(seen)


def dense_fit_digits(mode: str):
    """A dense LeNet-300-100 fit (under torchrun: in ``mode``, "ddp" or "fsdp")."""
    task = build_task("digits", batch_size=64, seed=0)
    torch.manual_seed(1)
    model = build_model("lenet300", task)
    return model, fit(model, task, TrainConfig(**{**DDP_TRAIN, "distributed": mode}))


def ddp_main(recipe, out, spy, kill, resume) -> None:
    import faulthandler
    import json
    import signal
    from pathlib import Path

    from torchslim.app import runner
    from torchslim.core import distributed
    from torchslim.pruning.masks import MaskKeeper, masks_of

    faulthandler.enable()  # a C++ abort prints every thread's Python stack (CI shows only the tail)
    torch.set_num_threads(1)
    distributed.init_from_env()
    rank = distributed.rank()
    if kill and rank == 1:
        run_stage = runner._run_stage

        def dying(model, stage, *args):
            if stage.name == kill:
                os.kill(os.getpid(), signal.SIGKILL)
            return run_stage(model, stage, *args)

        runner._run_stage = dying
    log = []
    summary = runner.run_recipe(recipe, out=out, resume=resume == "1", log=log.append)
    spy = Path(spy)
    spy.mkdir(parents=True, exist_ok=True)
    result = {"log": log, "metrics": [r["metric"] for r in summary["rows"]], "world": distributed.world_size()}
    if not kill and resume != "1":
        pruned, metric, seen = gradual_prune_digits()
        masks = {k: v.clone() for k, v in masks_of(pruned).items()}
        torch.save({"masks": masks, "weights": pruned.state_dict(), "seen": seen}, spy / f"rank{rank}.pt")
        result.update(gradual_metric=metric, digest=distributed.digest(pruned))
        dense, fsdp = dense_fit_digits("fsdp")
        torch.save(dense.state_dict(), spy / f"fsdp-rank{rank}.pt")
        result.update(fsdp_parallel=fsdp.parallel, fsdp_metric=build_task("digits").evaluate(dense))
        try:  # FSDP2 holds shards: a hook that edits whole weights after each step is refused
            fit(pruned, build_task("digits"), TrainConfig(epochs=1, distributed="fsdp"), hooks=[MaskKeeper()])
        except distributed.DistributedError as exc:
            result.update(fsdp_refusal=str(exc))
    (spy / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    from torchslim.core import distributed

    ddp_main(*sys.argv[2:])
    distributed.teardown()  # after ddp_main returned: no wrapped model is referenced any more
    sys.exit(0)

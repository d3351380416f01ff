"""Subprocess worker for the kill-and-resume test: trains LeNet-300-100 on digits with
per-epoch checkpoints and writes the final weights. SLOW_STEP_S makes every step sleep so the
parent can kill the run mid-way (sleeping does not change the numbers)."""

import os
import sys
import time

import torch

from torchslim.export.weights import save_weights
from torchslim.train import TrainConfig, fit
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


if __name__ == "__main__":
    main(*sys.argv[1:])

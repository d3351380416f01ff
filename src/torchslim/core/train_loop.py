"""The pieces of ``fit``'s loop: one step, the end of an epoch, checkpoints, progress, and the
``Parallel`` adapter that makes the same loop data-parallel under torchrun (``distributed.py``).

In one process ``Parallel`` does nothing (batches pass through with weight 1, no collective),
so single-process training is exactly what it was before DDP existed.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import distributed as dist
from .errors import TorchslimError
from .task import as_tensor, call_model
from .utils import atomic_write, to_device


def penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor | float:
    """L1/L2 penalty over weight tensors (dim >= 2; biases and norms are not penalised)."""
    if l1 == 0 and l2 == 0:
        return 0.0
    total: torch.Tensor | float = 0.0
    for p in model.parameters():
        if p.requires_grad and p.dim() >= 2:
            if l1:
                total = total + l1 * p.abs().sum()
            if l2:
                total = total + l2 * p.pow(2).sum()
    return total



class TrainingError(TorchslimError, FloatingPointError):
    """Training cannot go on (a non-finite loss); the message names the step and the cause."""


def _why_not_finite(model, inputs, outputs, loss, cfg) -> str:
    """Which of inputs, weights, outputs or the loss went non-finite first."""
    from .data_check import _tensors

    for name, t in _tensors(inputs):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"training loss is {loss.item()} because the batch's {name} hold NaN/Inf; clean the data"
    for name, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            return f"training loss is {loss.item()}: weight {name} is NaN/Inf (diverged); lower TrainConfig.lr (now {cfg.lr})"
    out = as_tensor(outputs)
    if out.is_floating_point() and not torch.isfinite(out.detach()).all():
        top = max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)
        if top > 1e6:
            return (f"training loss is {loss.item()}: the weights diverged (|w| up to {top:.2g}) and the outputs "
                    f"overflowed; lower TrainConfig.lr (now {cfg.lr})")
        return f"training loss is {loss.item()}: the model's outputs are NaN/Inf on finite inputs and weights"
    return f"training loss became {loss.item()}; lower TrainConfig.lr (now {cfg.lr}) or the l1/l2 penalties"


def train_step(net, model, inputs, targets, task, cfg, hooks, opt, scaler, device, use_amp, par) -> float:
    inputs, targets, weight = par.batch(inputs, targets)
    inputs, targets = to_device(inputs, device), to_device(targets, device)
    with torch.autocast(device_type=device.type, enabled=use_amp):
        outputs = call_model(net, inputs)
        loss = task.loss(outputs, targets)
        for hook in hooks:
            if hasattr(hook, "extra_loss"):
                loss = loss + hook.extra_loss(model, inputs, outputs, targets)
    if par.mode != "single":
        loss = loss * weight  # DDP averages gradients: this makes it the global batch's mean
    loss = loss + penalty(model, cfg.l1, cfg.l2)
    value = par.loss_value(loss)
    if not math.isfinite(value):
        raise TrainingError(_why_not_finite(model, inputs, outputs, loss, cfg))
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    par.after_backward()
    if cfg.grad_clip is not None:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return value


def end_of_epoch(model, task, cfg, sched, state, record) -> bool:
    """Validate, step the scheduler, track the best weights; True when early stopping fires."""
    val = task.evaluate(model, "val") if task.val is not None else None
    if val is not None:
        record["val_metric"] = val
    if sched is not None:
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val if val is not None else -record["train_loss"])
        else:
            sched.step()
    if val is None or cfg.early_stopping_patience is None:
        state["best_val"] = val if val is not None and (state["best_val"] is None or val > state["best_val"]) else state["best_val"]
        return False
    if state["best_val"] is None or val > state["best_val"]:
        state["best_val"], state["bad_epochs"] = val, 0
        state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= cfg.early_stopping_patience


def save_checkpoint(path: Path, model, opt, sched, scaler, loader, state) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "scaler": scaler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_loader": loader_generator(loader).get_state() if loader_generator(loader) is not None else None,
        "state": state,
    }
    atomic_write(path, lambda p: torch.save(payload, p))


def load_checkpoint(path: Path, model, opt, sched, scaler, loader, state) -> int:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    if sched is not None and payload["scheduler"] is not None:
        sched.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng_torch"])
    gen = loader_generator(loader)
    if gen is not None and payload["rng_loader"] is not None:
        gen.set_state(payload["rng_loader"])
    state.update(payload["state"])
    return state["epoch"]


def loader_generator(loader) -> torch.Generator | None:
    sampler = getattr(loader, "sampler", None)
    return getattr(sampler, "generator", None) or getattr(loader, "generator", None)


def progress_bar(setting: bool | None, total: int, state: dict, epochs: int,
                 metric_name: str = "metric") -> Callable[[int | None], None]:
    """fit's bar (``torchslim.core.progress``: auto on in a terminal, rank 0 only): steps done of
    ``total``, the epoch running, and the last finished epoch's loss and val metric, read from
    fit's ``state``. Returns advance(n), and advance(None) to close."""
    from . import progress

    bar = progress.bar("training", total, setting=setting, completed=state["step"])

    def advance(n: int | None) -> None:
        if n is None:
            bar.close()
            return
        last = state["history"][-1] if state["history"] else {}
        bar.advance(n, epoch=f"{min(state['epoch'] + 1, epochs)}/{epochs}", loss=last.get("train_loss"),
                    **{f"val {metric_name}": last.get("val_metric")})

    return advance


class Parallel:
    """How fit's loop runs: alone (every method a pass-through) or as one rank of a torchrun
    job, in ``mode`` "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 ``fully_shard``)."""

    def __init__(self, mode: str):
        self.on = dist.active()
        self.mode = mode if self.on else "single"
        self.outside: list[torch.Tensor] = []

    def describe(self) -> str:
        return self.mode if self.mode == "single" else f"{self.mode} x{dist.world_size()}"

    @property
    def writes(self) -> bool:
        return dist.is_main()

    def prepare(self, model: nn.Module, cfg, hooks, params) -> tuple[nn.Module, nn.Module]:
        """(net the loop calls, model the hooks and the optimizer see)."""
        if self.mode == "single":
            return model, model
        dist.sync_module(model, "before training")  # every rank starts from rank 0's model
        if self.mode == "ddp":
            return dist.wrap_ddp(model), model
        stepping = [type(h).__name__ for h in hooks if hasattr(h, "after_step")]
        if stepping or params is not None:
            what = f"the hooks {stepping} edit whole weights after each step" if stepping else \
                "an explicit parameter list (params=) is not part of the sharded module"
            raise dist.DistributedError(f"TrainConfig.distributed='fsdp': {what}, and FSDP2 holds only shards; "
                                        "use distributed: ddp for this stage")
        work = dist.wrap_fsdp(copy.deepcopy(model))  # the original keeps the full weights (host memory)
        return work, work

    def watch(self, net: nn.Module, opt_params) -> None:
        if self.mode == "ddp":
            self.outside = dist.grads_outside(net.module, opt_params)

    def batch(self, inputs, targets):
        if self.mode == "single":
            return inputs, targets, 1.0
        return dist.shard_batch(inputs, targets)

    def after_backward(self) -> None:
        if self.outside:
            dist.all_reduce_grads(self.outside)

    def loss_value(self, loss: torch.Tensor) -> float:
        return loss.item() if self.mode == "single" else dist.all_mean(loss.item())

    def end_epoch(self, model: nn.Module) -> None:
        if self.mode == "ddp":  # buffers (BN statistics, observers) differ after the last forward
            dist.sync_module(model, "end of epoch", buffers_only=True)

    def finish(self, model: nn.Module, trained: nn.Module) -> None:
        if self.mode == "single":
            return
        if self.mode == "fsdp":
            with torch.no_grad():
                full = dist.gather_full_state(trained)
                model.load_state_dict({k: v.to(model.state_dict()[k].device) for k, v in full.items()})
        # buffers may differ after the last forward; parameters must already be equal (not re-broadcast,
        # so a rank that diverged is caught here rather than papered over)
        dist.sync_module(model, "after training", buffers_only=True)
        dist.verify_identical(model, "after training")
        gc.collect()  # drop the DDP reducer (and its autograd hooks) now, not at some later step

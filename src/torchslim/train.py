"""fit(model, task, TrainConfig): a plain training loop with the hooks compression needs.

Optimizers and LR schedules are chosen by their ``torch.optim`` / ``torch.optim.lr_scheduler``
class names plus kwargs (nothing is re-implemented). Hooks let techniques step in without a
special trainer: ``extra_loss`` (distillation, L1 on masks, ...) and ``after_step`` (re-apply
pruning masks, gradual schedules, ...).

Checkpoints are written atomically at the end of every epoch (model, optimizer, scheduler,
RNG states, the loader's shuffling generator, early-stopping state); ``resume=True`` continues
from the last one and reaches the same weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .errors import TorchslimError, check
from .task import Task, as_tensor, call_model
from .utils import atomic_write, default_device, seed_everything, to_device

OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam")


class Hook(Protocol):
    """Anything with some of these methods can be passed to ``fit(hooks=[...])``."""

    def extra_loss(self, model: nn.Module, inputs: Any, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...


@dataclass
class TrainConfig:
    """How to train. Names are torch class names, kwargs go to their constructors.

    epochs / max_steps: budget (max_steps, if set, stops early within an epoch).
    optimizer: e.g. "SGD" with optimizer_kwargs={"momentum": 0.9}, "Adam", "AdamW", "RMSprop".
    scheduler: None (fixed LR) or a ``torch.optim.lr_scheduler`` name: "ExponentialLR",
        "StepLR", "CosineAnnealingLR" (T_max defaults to the total epochs), "ReduceLROnPlateau"
        (stepped with the validation metric). Schedulers step once per epoch.
    l1 / l2: penalties added to the loss (l2 here is an explicit penalty; use
        optimizer_kwargs={"weight_decay": ...} for decoupled decay).
    early_stopping_patience: epochs without val-metric improvement before stopping (None: off);
        the best val weights are restored at the end when it is on.
    checkpoint_dir + resume: per-epoch atomic checkpoints and continuing from them.
    """

    epochs: int = 10
    max_steps: int | None = None
    lr: float = 1e-3
    optimizer: str = "Adam"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    l1: float = 0.0
    l2: float = 0.0
    grad_clip: float | None = None
    amp: bool = False
    early_stopping_patience: int | None = None
    seed: int = 0
    device: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        # bounds on both sides: a budget of 1e9 epochs hangs, lr=inf validates and dies later
        _int(self.epochs, "epochs", 0, MAX_EPOCHS)
        self.max_steps is None or _int(self.max_steps, "max_steps", 0, MAX_STEPS)
        _num(self.lr, "lr", 0.0, 10.0, low_open=True)
        check(isinstance(self.optimizer, str) and hasattr(torch.optim, self.optimizer) and self.optimizer[0].isupper(),
              "TrainConfig.optimizer", f"unknown torch.optim optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        check(self.scheduler is None or (isinstance(self.scheduler, str) and hasattr(torch.optim.lr_scheduler, self.scheduler)
                                         and self.scheduler[0].isupper()), "TrainConfig.scheduler",
              f"unknown torch.optim.lr_scheduler {self.scheduler!r}; e.g. StepLR, ExponentialLR, CosineAnnealingLR, ReduceLROnPlateau")
        _num(self.l1, "l1", 0.0, 1.0)
        _num(self.l2, "l2", 0.0, 1.0)
        self.grad_clip is None or _num(self.grad_clip, "grad_clip", 0.0, 1e6, low_open=True)
        self.early_stopping_patience is None or _int(self.early_stopping_patience, "early_stopping_patience", 1, MAX_EPOCHS)
        _int(self.seed, "seed", 0, 2**63 - 1)
        _kwargs(self.optimizer_kwargs, "optimizer_kwargs", getattr(torch.optim, self.optimizer), skip=("params", "lr"))
        if self.scheduler is not None:
            _kwargs(self.scheduler_kwargs, "scheduler_kwargs", getattr(torch.optim.lr_scheduler, self.scheduler),
                    skip=("optimizer",))
        check(not self.scheduler_kwargs or self.scheduler is not None, "TrainConfig.scheduler_kwargs",
              "given without a scheduler; set scheduler too")
        _device(self.device)
        check(not self.resume or self.checkpoint_dir is not None, "TrainConfig.resume", "needs checkpoint_dir to resume from")


MAX_EPOCHS = 100_000
MAX_STEPS = 10**9


def _int(value: Any, name: str, low: int, high: int) -> bool:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    check(ok, f"TrainConfig.{name}", f"must be an integer in [{low}, {high}], got {value!r}")
    return True


def _num(value: Any, name: str, low: float, high: float, low_open: bool = False) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    bracket = "(" if low_open else "["
    check(ok, f"TrainConfig.{name}", f"must be a finite number in {bracket}{low:g}, {high:g}], got {value!r}")
    return True


def _kwargs(kwargs: Any, name: str, cls: type, skip: tuple[str, ...]) -> None:
    """kwargs must be names of cls's constructor, with finite numbers (no nan/inf)."""
    import inspect

    check(isinstance(kwargs, dict), f"TrainConfig.{name}", f"must be a mapping, got {type(kwargs).__name__}")
    params = inspect.signature(cls).parameters
    known = [p for p in params if p not in skip and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    for key, value in kwargs.items():
        check(key in known, f"TrainConfig.{name}.{key}", f"{cls.__name__} takes no {key!r}; it takes {', '.join(known)}")
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            bad = isinstance(v, float) and not math.isfinite(v)
            check(not bad and (not isinstance(v, (int, float)) or abs(v) <= 1e12), f"TrainConfig.{name}.{key}",
                  f"must be finite and at most 1e12 in size, got {value!r}")


def _device(device: Any) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        check(False, "TrainConfig.device", f"not a torch device: {device!r}; use 'cpu', 'cuda', 'cuda:0' or null")
    check(dev.type != "cuda" or torch.cuda.is_available(), "TrainConfig.device",
          f"{device!r} asked for but CUDA is not available here; use 'cpu' or null")
    check(dev.type in ("cpu", "cuda", "mps"), "TrainConfig.device", f"device type {dev.type!r} is not supported; use cpu or cuda")


@dataclass
class FitResult:
    epochs_run: int
    steps: int
    best_val: float | None
    history: list[dict[str, float]]
    stopped_early: bool = False
    resumed_from_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    return getattr(torch.optim, cfg.optimizer)(params, lr=cfg.lr, **cfg.optimizer_kwargs)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    if cfg.scheduler is None:
        return None
    kwargs = dict(cfg.scheduler_kwargs)
    if cfg.scheduler == "CosineAnnealingLR":
        kwargs.setdefault("T_max", max(cfg.epochs, 1))
    if cfg.scheduler == "ReduceLROnPlateau":
        kwargs.setdefault("mode", "max")  # stepped with the val metric (higher is better)
    return getattr(torch.optim.lr_scheduler, cfg.scheduler)(opt, **kwargs)


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


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig | None = None,
    hooks: Sequence[Hook] = (),
    params: Any = None,
) -> FitResult:
    """Train model in place on task.train; return what happened. ``params`` overrides the
    parameters given to the optimizer (e.g. only centroids, or a student plus a projection)."""
    cfg = cfg or TrainConfig()
    device = torch.device(cfg.device) if cfg.device else default_device()
    model.to(device)
    seed_everything(cfg.seed)
    loader = task.split("train")
    gen = _loader_generator(loader)
    if gen is not None:  # shuffling depends on cfg.seed only, not on what ran before
        gen.manual_seed(cfg.seed)
    opt = build_optimizer(params if params is not None else [p for p in model.parameters() if p.requires_grad], cfg)
    sched = build_scheduler(opt, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = {"epoch": 0, "step": 0, "best_val": None, "best_state": None, "bad_epochs": 0, "history": []}
    ckpt = Path(cfg.checkpoint_dir) / "train_last.pt" if cfg.checkpoint_dir else None
    resumed_from = None
    if cfg.resume and ckpt is not None and ckpt.exists():
        resumed_from = _load_checkpoint(ckpt, model, opt, sched, scaler, loader, state)
    stopped_early = False
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * len(loader)
    progress = _progress(cfg.progress, total_steps, state["step"])
    while state["epoch"] < cfg.epochs and (cfg.max_steps is None or state["step"] < cfg.max_steps):
        model.train()
        losses = []
        for inputs, targets in loader:
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                break
            try:
                loss = _train_step(model, inputs, targets, task, cfg, hooks, opt, scaler, device, use_amp)
            except TrainingError as exc:
                raise TrainingError(f"step {state['step'] + 1} (epoch {state['epoch'] + 1}): {exc}") from None
            state["step"] += 1
            for hook in hooks:
                if hasattr(hook, "after_step"):
                    hook.after_step(model, state["step"])
            losses.append(loss)
            progress(1)
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "train_loss": sum(losses) / max(len(losses), 1),
                  "lr": opt.param_groups[0]["lr"]}
        stopped_early = _end_of_epoch(model, task, cfg, sched, state, record)
        state["history"].append(record)
        if ckpt is not None:
            _save_checkpoint(ckpt, model, opt, sched, scaler, loader, state)
        if stopped_early:
            break
    progress(None)
    if cfg.early_stopping_patience is not None and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return FitResult(state["epoch"], state["step"], state["best_val"], state["history"], stopped_early, resumed_from)


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


def _train_step(model, inputs, targets, task, cfg, hooks, opt, scaler, device, use_amp) -> float:
    inputs, targets = to_device(inputs, device), to_device(targets, device)
    with torch.autocast(device_type=device.type, enabled=use_amp):
        outputs = call_model(model, inputs)
        loss = task.loss(outputs, targets)
        for hook in hooks:
            if hasattr(hook, "extra_loss"):
                loss = loss + hook.extra_loss(model, inputs, outputs, targets)
    loss = loss + penalty(model, cfg.l1, cfg.l2)
    if not math.isfinite(loss.item()):
        raise TrainingError(_why_not_finite(model, inputs, outputs, loss, cfg))
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip is not None:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.item()


def _end_of_epoch(model, task, cfg, sched, state, record) -> bool:
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


def _save_checkpoint(path: Path, model, opt, sched, scaler, loader, state) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "scaler": scaler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_loader": _loader_generator(loader).get_state() if _loader_generator(loader) is not None else None,
        "state": state,
    }
    atomic_write(path, lambda p: torch.save(payload, p))


def _load_checkpoint(path: Path, model, opt, sched, scaler, loader, state) -> int:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    if sched is not None and payload["scheduler"] is not None:
        sched.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng_torch"])
    gen = _loader_generator(loader)
    if gen is not None and payload["rng_loader"] is not None:
        gen.set_state(payload["rng_loader"])
    state.update(payload["state"])
    return state["epoch"]


def _loader_generator(loader) -> torch.Generator | None:
    sampler = getattr(loader, "sampler", None)
    return getattr(sampler, "generator", None) or getattr(loader, "generator", None)


def _progress(enabled: bool, total: int, done: int) -> Callable[[int | None], None]:
    """A rich progress bar when enabled; returns advance(n) and advance(None) to close."""
    if not enabled:
        return lambda n: None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    tid = bar.add_task("training", total=total, completed=done)

    def advance(n: int | None) -> None:
        if n is None:
            bar.stop()
        else:
            bar.advance(tid, n)

    return advance

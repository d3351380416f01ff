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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import distributed
from .bounds import bounded, count, seed_field
from .config_base import config
from .errors import check
from .task import Task
from .train_loop import (  # noqa: F401 - TrainingError and penalty are part of this module's API
    Parallel,
    TrainingError,
    end_of_epoch,
    load_checkpoint,
    loader_generator,
    penalty,
    progress_bar,
    save_checkpoint,
    train_step,
)
from .utils import default_device, seed_everything

OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam")


class Hook(Protocol):
    """Anything with some of these methods can be passed to ``fit(hooks=[...])``."""

    def extra_loss(self, model: nn.Module, inputs: Any, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...


MAX_EPOCHS = 100_000
MAX_STEPS = 10**9


@config(stage="train")
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
    distributed: under torchrun, "ddp" (DistributedDataParallel, the default) or "fsdp" (FSDP2
        ``fully_shard``: dense fine-tunes and distillation only, without checkpoint_dir, early
        stopping, l1/l2 or amp); ignored in one process. The global batch is the task's batch size
        (per-rank batch = global / N) and lr is not rescaled: see ``torchslim.core.distributed``.
    """

    epochs: int = count(10, 0, MAX_EPOCHS)
    max_steps: int | None = count(None, 0, MAX_STEPS, optional=True)
    lr: float = bounded(1e-3, 0.0, 10.0, low_open=True)
    optimizer: str = "Adam"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    l1: float = bounded(0.0, 0.0, 1.0)
    l2: float = bounded(0.0, 0.0, 1.0)
    grad_clip: float | None = bounded(None, 0.0, 1e6, low_open=True)
    amp: bool = False
    early_stopping_patience: int | None = count(None, 1, MAX_EPOCHS, optional=True)
    seed: int = seed_field()
    device: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool | None = None  # None: auto (bars in a terminal, off in files/pipes/pytest; torchslim.core.progress)
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        # bounds on both sides (declared on the fields, checked by the config contract)
        check(isinstance(self.optimizer, str) and hasattr(torch.optim, self.optimizer) and self.optimizer[0].isupper(),
              "TrainConfig.optimizer", f"unknown torch.optim optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        check(self.scheduler is None or (isinstance(self.scheduler, str) and hasattr(torch.optim.lr_scheduler, self.scheduler)
                                         and self.scheduler[0].isupper()), "TrainConfig.scheduler",
              f"unknown torch.optim.lr_scheduler {self.scheduler!r}; e.g. StepLR, ExponentialLR, CosineAnnealingLR, ReduceLROnPlateau")
        _kwargs(self.optimizer_kwargs, "optimizer_kwargs", getattr(torch.optim, self.optimizer), skip=("params", "lr"))
        if self.scheduler is not None:
            _kwargs(self.scheduler_kwargs, "scheduler_kwargs", getattr(torch.optim.lr_scheduler, self.scheduler),
                    skip=("optimizer",))
        check(not self.scheduler_kwargs or self.scheduler is not None, "TrainConfig.scheduler_kwargs",
              "given without a scheduler; set scheduler too")
        _device(self.device)
        check(not self.resume or self.checkpoint_dir is not None, "TrainConfig.resume", "needs checkpoint_dir to resume from")
        check(self.distributed in distributed.MODES, "TrainConfig.distributed",
              f"must be 'ddp' or 'fsdp' (how to train under torchrun), got {self.distributed!r}")
        if self.distributed == "fsdp":
            unsupported = [name for name, on in (("checkpoint_dir", self.checkpoint_dir is not None),
                                                 ("early_stopping_patience", self.early_stopping_patience is not None),
                                                 ("l1", self.l1 != 0), ("l2", self.l2 != 0), ("amp", self.amp)) if on]
            check(not unsupported, "TrainConfig.distributed",
                  f"'fsdp' does not support {', '.join(unsupported)} yet; drop it or use distributed: ddp")


def check_ctor_kwargs(kwargs: Any, field: str, cls: type, skip: tuple[str, ...]) -> None:
    """kwargs (the config field ``field``, e.g. "TrainConfig.optimizer_kwargs") must be names of
    cls's constructor, with finite numbers (no nan/inf) of at most 1e12 in size."""
    import inspect

    check(isinstance(kwargs, dict), field, f"must be a mapping, got {type(kwargs).__name__}")
    params = inspect.signature(cls).parameters
    known = [p for p in params if p not in skip and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    for key, value in kwargs.items():
        check(key in known, f"{field}.{key}", f"{cls.__name__} takes no {key!r}; it takes {', '.join(known)}")
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            bad = isinstance(v, float) and not math.isfinite(v)
            check(not bad and (not isinstance(v, (int, float)) or abs(v) <= 1e12), f"{field}.{key}",
                  f"must be finite and at most 1e12 in size, got {value!r}")


def _kwargs(kwargs: Any, name: str, cls: type, skip: tuple[str, ...]) -> None:
    check_ctor_kwargs(kwargs, f"TrainConfig.{name}", cls, skip)


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
    parallel: str = "single"  # or "ddp x2", "fsdp x4": how it ran under torchrun

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


def with_compression_hooks(model: nn.Module, hooks: Sequence[Hook]) -> list:
    """hooks plus those of every compression present on model (pruning masks kept at zero, LSQ
    scales kept positive, ...; stage.training_hooks), so whatever trains keeps what earlier
    stages bought by construction, whoever calls fit. A kind of hook already given is not added
    twice."""
    from .compression_hooks import training_hooks

    given = {type(h) for h in hooks}
    return [*hooks, *(h for h in training_hooks(model) if type(h) not in given)]


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig | None = None,
    hooks: Sequence[Hook] = (),
    params: Any = None,
) -> FitResult:
    """Train model in place on task.train; return what happened. ``params`` overrides the
    parameters given to the optimizer (e.g. only centroids, or a student plus a projection).

    Under torchrun (``distributed.init_from_env()`` done) every rank runs this with the same
    arguments and trains its slice of each global batch (``cfg.distributed``: "ddp" or "fsdp");
    only rank 0 writes the checkpoint, and every rank ends with rank 0's model (verified)."""
    cfg = cfg or TrainConfig()
    hooks = with_compression_hooks(model, hooks)
    par = Parallel(cfg.distributed)
    device = torch.device(cfg.device) if cfg.device else default_device()
    if par.on and device.type == "cuda":
        device = distributed.device()
    if par.mode != "fsdp":  # under FSDP the full model stays where it is; fully_shard moves the shards
        model.to(device)
    seed_everything(cfg.seed)
    loader = task.split("train")
    gen = loader_generator(loader)
    if gen is not None:  # shuffling depends on cfg.seed only, not on what ran before
        gen.manual_seed(cfg.seed)
    net, model_ = par.prepare(model, cfg, hooks, params)
    opt_params = params if params is not None else [p for p in model_.parameters() if p.requires_grad]
    opt = build_optimizer(opt_params, cfg)
    par.watch(net, opt_params)
    sched = build_scheduler(opt, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = {"epoch": 0, "step": 0, "best_val": None, "best_state": None, "bad_epochs": 0, "history": []}
    ckpt = Path(cfg.checkpoint_dir) / "train_last.pt" if cfg.checkpoint_dir else None
    resumed_from = None
    if cfg.resume and ckpt is not None and ckpt.exists():
        resumed_from = load_checkpoint(ckpt, model_, opt, sched, scaler, loader, state)
    stopped_early = False
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * len(loader)
    progress = progress_bar(cfg.progress, total_steps, state, cfg.epochs, task.metric_name)  # rank 0 only
    while state["epoch"] < cfg.epochs and (cfg.max_steps is None or state["step"] < cfg.max_steps):
        net.train()
        losses = []
        for inputs, targets in loader:
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                break
            try:
                loss = train_step(net, model_, inputs, targets, task, cfg, hooks, opt, scaler, device, use_amp, par)
            except TrainingError as exc:
                raise TrainingError(f"step {state['step'] + 1} (epoch {state['epoch'] + 1}): {exc}") from None
            state["step"] += 1
            for hook in hooks:
                if hasattr(hook, "after_step"):
                    hook.after_step(model_, state["step"])
            losses.append(loss)
            progress(1)
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "train_loss": sum(losses) / max(len(losses), 1),
                  "lr": opt.param_groups[0]["lr"]}
        par.end_epoch(model_)
        stopped_early = end_of_epoch(model_, task, cfg, sched, state, record)
        state["history"].append(record)
        if ckpt is not None and par.writes:
            save_checkpoint(ckpt, model_, opt, sched, scaler, loader, state)
        if stopped_early:
            break
    progress(None)
    if cfg.early_stopping_patience is not None and state["best_state"] is not None:
        model_.load_state_dict(state["best_state"])
    par.finish(model, model_)
    return FitResult(state["epoch"], state["step"], state["best_val"], state["history"], stopped_early, resumed_from,
                     par.describe())

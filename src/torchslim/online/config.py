"""OnlineConfig: how a model keeps learning from a stream, validated before any work starts."""

from __future__ import annotations

from dataclasses import asdict, field
from typing import Any

import torch

from ..core.bounds import bounded, check_bounds, count, fraction, seed_field
from ..core.config_base import config
from ..core.errors import check
from ..core.train import check_ctor_kwargs

DETECTORS = ("adwin", "page_hinkley", None)
MAX_BATCHES = 10**9


def _kwargs(kwargs: Any, name: str, cls: type, skip: tuple[str, ...]) -> None:
    check_ctor_kwargs(kwargs, f"OnlineConfig.{name}", cls, skip)


@config
class OnlineConfig:
    """How to learn online (prequential: every batch is predicted and scored, then learned from).

    optimizer / optimizer_kwargs / lr: a ``torch.optim`` class by name and its arguments.
    scheduler / scheduler_kwargs: a ``torch.optim.lr_scheduler`` by name, stepped once per batch
        (e.g. "ExponentialLR" with gamma, "StepLR" with step_size in batches); None = fixed LR.
    steps_per_batch: optimizer steps taken on each arriving batch (1 = plain online SGD).
    learn: False = frozen (prediction and scoring only: the "frozen compressed" arm).
    detector: "adwin" (River's ADWIN on the per-sample error stream), "page_hinkley" (River's)
        or None; drift_delta is ADWIN's delta (false-alarm bound) / Page-Hinkley's threshold.
    boost_lr / boost_batches: on a drift event the LR is multiplied by boost_lr for that many
        batches (1.0 = no boost).
    sparse_lr_power: a pruned tensor learns at lr * (1 / its density) ** sparse_lr_power (0 = the
        same lr as the dense tensors); with Adam a sparse layer otherwise adapts more slowly.
    regrow_fraction / regrow_gap: on a drift event, if prequential accuracy over the
        boost_batches after it is still regrow_gap below its level before the drift, this
        fraction of the pruned weights is regrown (largest gradient first, RigL-style, starting
        at zero); 0 = never (masks then stay exactly as they were).
    regrow_keep_sparsity: True = drop-and-grow (RigL): regrow_fraction of each pruned tensor's
        kept weights (smallest magnitude) are pruned and as many pruned ones (largest gradient)
        come back, so every tensor keeps its non-zeros and the sparse bytes hold; False = grow
        regrow_fraction of the pruned weights (denser, larger file).
    regrow_rounds: capacity checks per drift (one WINDOW of batches apart while still short).
    teacher / teacher_batches / teacher_alpha / teacher_temperature: on a drift event (a rise in
        error) the next teacher_batches batches learn from (1 - alpha) * task loss + alpha * the
        distillation loss of torchslim.distill (T = teacher_temperature) from ``teacher`` (an
        nn.Module, or "package.module:function"; in a recipe also a model spec); None = no
        teacher. The teacher runs only inside those windows.
    replay_capacity / replay_batch: bounded reservoir of past samples; replay_batch of them are
        mixed into every update (0 = no replay).
    ewc_lambda / ewc_batches: EWC penalty strength; the diagonal Fisher is taken over the last
        ewc_batches batches at each drift event (0 = no EWC).
    checkpoint_every: batches between checkpoints (when online() is given checkpoint_dir).
    eval_every: batches between evaluations of the held-out segment sets (forgetting).
    max_batches: stop after this many batches of the stream (None = until it ends).
    seed: seeds the replay reservoir and torch (results equal across kill/resume).
    progress: "auto" or None (``torchslim.core.progress``'s rule, as TrainConfig.progress: a bar in a
        terminal, none in a file, a pipe, under pytest, in a worker process or with
        TORCHSLIM_PROGRESS=0), True or False. The bar counts batches and shows samples/s,
        prequential accuracy and drift events so far; the last drift event is its note.
    """

    lr: float = bounded(1e-3, 0.0, 10.0, low_open=True)
    optimizer: str = "Adam"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    steps_per_batch: int = count(1, 1, 100)
    learn: bool = True
    grad_clip: float | None = bounded(None, 0.0, 1e6, low_open=True)
    detector: str | None = "adwin"
    drift_delta: float = bounded(0.002, 0.0, 1000.0, low_open=True)
    boost_lr: float = bounded(3.0, 0.0, 100.0, low_open=True)
    boost_batches: int = count(20, 0, MAX_BATCHES)
    sparse_lr_power: float = bounded(0.5, 0.0, 1.0)
    regrow_fraction: float = fraction(0.0)
    regrow_gap: float = fraction(0.05)
    regrow_keep_sparsity: bool = True
    regrow_rounds: int = count(3, 1, 100)
    teacher: Any = None
    teacher_batches: int = count(30, 1, MAX_BATCHES)
    teacher_alpha: float = fraction(0.7)
    teacher_temperature: float = bounded(2.0, 0.0, 1000.0, low_open=True)
    replay_capacity: int = count(0, 0, 10_000_000)
    replay_batch: int = count(0, 0, 65_536)
    ewc_lambda: float = bounded(0.0, 0.0, 1e9)
    ewc_batches: int = count(10, 1, 100_000)
    checkpoint_every: int = count(50, 1, MAX_BATCHES)
    eval_every: int = count(50, 1, MAX_BATCHES)
    max_batches: int | None = count(None, 0, MAX_BATCHES, optional=True)
    seed: int = seed_field()
    progress: bool | str | None = "auto"

    def __post_init__(self) -> None:
        check_bounds(self)  # every numeric field's two bounds, declared on the field
        check(isinstance(self.optimizer, str) and self.optimizer[:1].isupper() and hasattr(torch.optim, self.optimizer)
              and isinstance(getattr(torch.optim, self.optimizer), type), "OnlineConfig.optimizer",
              f"unknown torch.optim optimizer {self.optimizer!r}; use e.g. SGD, Adam, AdamW, RMSprop")
        _kwargs(self.optimizer_kwargs, "optimizer_kwargs", getattr(torch.optim, self.optimizer), ("params", "lr"))
        check(self.scheduler is None or (isinstance(self.scheduler, str) and self.scheduler[:1].isupper()
                                         and hasattr(torch.optim.lr_scheduler, self.scheduler)
                                         and self.scheduler != "ReduceLROnPlateau"), "OnlineConfig.scheduler",
              f"unknown or unsupported per-batch scheduler {self.scheduler!r}; use e.g. ExponentialLR, StepLR, "
              "CosineAnnealingLR, LinearLR (ReduceLROnPlateau needs a validation metric: not online)")
        if self.scheduler is not None:
            _kwargs(self.scheduler_kwargs, "scheduler_kwargs", getattr(torch.optim.lr_scheduler, self.scheduler), ("optimizer",))
        check(not self.scheduler_kwargs or self.scheduler is not None, "OnlineConfig.scheduler_kwargs",
              "given without a scheduler; set scheduler too")
        check(isinstance(self.regrow_keep_sparsity, bool), "OnlineConfig.regrow_keep_sparsity",
              f"must be true or false, got {self.regrow_keep_sparsity!r}")
        check(isinstance(self.learn, bool), "OnlineConfig.learn", f"must be true or false, got {self.learn!r}")
        check(self.detector in DETECTORS, "OnlineConfig.detector",
              f"unknown drift detector {self.detector!r}; use adwin, page_hinkley or null")
        check(self.detector != "adwin" or self.drift_delta < 1.0, "OnlineConfig.drift_delta",
              f"ADWIN's delta is a probability in (0, 1), got {self.drift_delta!r}")
        check(self.teacher is None or isinstance(self.teacher, (torch.nn.Module, str)), "OnlineConfig.teacher",
              f"must be an nn.Module or 'package.module:function', got {type(self.teacher).__name__}")
        check(self.teacher is None or self.learn, "OnlineConfig.teacher", "a teacher needs learn: true")
        check(self.replay_batch == 0 or self.replay_capacity > 0, "OnlineConfig.replay_batch",
              "replay_batch > 0 needs replay_capacity > 0 (a buffer to draw from)")
        check(self.progress in (True, False, "auto", None), "OnlineConfig.progress",
              f"must be true, false, auto or null (auto), got {self.progress!r}")

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        teacher = self.teacher  # a module is named, not serialized (run.json stays JSON)
        out = asdict(dataclasses.replace(self, teacher=None))
        out["teacher"] = teacher if teacher is None or isinstance(teacher, str) else type(teacher).__name__
        return out

"""Knowledge distillation: a student learns from a teacher's soft outputs and features.

Logit KD follows Hinton et al. (2015): ``T² · KL(softmax(t/T) || softmax(s/T))``, the T²
keeping the soft-target gradients on the scale of the hard-label ones when T changes. Feature KD
matches chosen intermediate outputs (MSE), through a learned 1x1 projection when widths differ.

It plugs into ``torchslim.core.train.fit`` as a hook (``DistillationHook.extra_loss``), so it also
serves as recovery after pruning or quantization (teacher = the uncompressed model).

How the mix ``(1-α)·task_loss + α·T²·KL`` is built: ``fit`` always adds ``task.loss``, so
``apply`` trains on a copy of the task whose loss is scaled by ``(1-α)`` (``distill_task``), and
the hook adds ``α·T²·KL`` (+ feature terms). In unlabeled mode the task loss is replaced by zero,
so the train split's targets are never read (placeholders are fine).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core.bounds import bounded, check_bounds, fraction, seed_field
from .core.config_base import config
from .core.errors import ConfigError, check
from .core.losses import kd_loss
from .core.stage import StageResult, register_stage, training_hooks
from .core.task import Task, as_tensor, call_model, load_callable, resize_batch
from .core.train import TrainConfig, fit
from .core.utils import batch_size_of, default_device, eval_mode, to_device

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@config(renamed={"train": "finetune"})
class DistillConfig:
    """How to distill.

    teacher: the teacher nn.Module, or "package.module:function" returning one (recipes);
        may also be given to ``apply(..., teacher=...)``.
    temperature: softmax temperature T > 0 for the soft targets.
    alpha: weight of the soft loss in [0, 1]; the hard-label loss gets 1 - alpha.
    features: {student_module_name: teacher_module_name} pairs matched by MSE.
    feature_weight: weight of the summed feature losses.
    unlabeled: soft (weight 1, alpha unused) and feature losses only; the train split's targets
        are ignored.
    finetune: the training budget (a torchslim.core.train.TrainConfig), as everywhere training happens.
    seed: seeds the initialization of the feature projections (the training itself is seeded
        by ``finetune.seed``).
    """

    teacher: Any = None
    temperature: float = bounded(4.0, 0, 1000, low_open=True)
    alpha: float = fraction(0.9)
    features: dict[str, str] = field(default_factory=dict)
    feature_weight: float = bounded(1.0, 0, 1e6)
    unlabeled: bool = False
    finetune: TrainConfig = field(default_factory=TrainConfig)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        check_bounds(self)
        check(isinstance(self.temperature, (int, float)) and self.temperature > 0, "DistillConfig.temperature",
              f"must be > 0, got {self.temperature!r} (Hinton et al. use 2-20)")
        check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1, "DistillConfig.alpha",
              f"must be in [0, 1] (weight of the soft loss), got {self.alpha!r}")
        check(self.feature_weight >= 0, "DistillConfig.feature_weight", f"must be >= 0, got {self.feature_weight!r}")
        check(isinstance(self.features, Mapping) and all(isinstance(k, str) and isinstance(v, str)
              for k, v in self.features.items()), "DistillConfig.features",
              "must map student module names to teacher module names, e.g. {'layers.1': 'layers.3'}")
        check(self.teacher is None or isinstance(self.teacher, (nn.Module, str)), "DistillConfig.teacher",
              f"must be an nn.Module or 'package.module:function', got {type(self.teacher).__name__}")
        check(isinstance(self.finetune, TrainConfig), "DistillConfig.finetune",
              "must be a torchslim.core.train.TrainConfig (distillation is training: it needs a budget)")


def distill_task(task: Task, alpha: float, unlabeled: bool) -> Task:
    """A copy of task whose training loss is (1-alpha)·task.loss (zero when unlabeled)."""
    base = task.loss
    if unlabeled or alpha == 1:
        def loss(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
            return as_tensor(outputs).sum() * 0.0  # keeps the graph; targets never read
    else:
        def loss(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
            return (1 - alpha) * base(outputs, targets)
    return dataclasses.replace(task, loss=loss)


class _Capture:
    """Forward hook that keeps the latest output of a module."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.value = as_tensor(output)


def _projection(student_mod: nn.Module, s: torch.Tensor, t: torch.Tensor, name: str) -> nn.Module:
    """Identity when shapes agree, else a 1x1 conv (conv features) or a Linear (last dim)."""
    if s.shape == t.shape:
        return nn.Identity()
    if isinstance(student_mod, _CONVS) or (s.ndim in (3, 4, 5) and isinstance(student_mod, nn.modules.batchnorm._BatchNorm)):
        check(s.shape[2:] == t.shape[2:], "DistillConfig.features",
              f"{name}: spatial shapes differ (student {tuple(s.shape)}, teacher {tuple(t.shape)}); pick layers at the same resolution")
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[s.ndim]
        return conv(s.shape[1], t.shape[1], 1)
    check(s.shape[:-1] == t.shape[:-1], "DistillConfig.features",
          f"{name}: shapes differ beyond the last dim (student {tuple(s.shape)}, teacher {tuple(t.shape)})")
    return nn.Linear(s.shape[-1], t.shape[-1])


class DistillationHook:
    """``fit`` hook adding alpha·T²·KL(teacher || student) plus weighted feature MSE.

    Call ``setup(student, inputs)`` once (``apply`` does) to check shapes on one batch and build
    the projections; train ``student`` together with ``hook.parameters()``; ``close()`` after.
    """

    def __init__(self, teacher: nn.Module, cfg: DistillConfig):
        self.teacher = teacher.eval()
        self.cfg = cfg
        self.projections = nn.ModuleDict()
        self._student: dict[str, _Capture] = {}
        self._teacher: dict[str, _Capture] = {}

    def setup(self, student: nn.Module, inputs: Any) -> None:
        """Register feature hooks, run one batch, check output shapes, build projections."""
        s_mods, t_mods = dict(student.named_modules()), dict(self.teacher.named_modules())
        for s_name, t_name in self.cfg.features.items():
            check(s_name in s_mods, "DistillConfig.features", f"student has no module {s_name!r} (e.g. {_some(s_mods)})")
            check(t_name in t_mods, "DistillConfig.features", f"teacher has no module {t_name!r} (e.g. {_some(t_mods)})")
        for s_name, t_name in self.cfg.features.items():
            self._student[s_name] = _Capture(s_mods[s_name])
            self._teacher[s_name] = _Capture(t_mods[t_name])
        try:
            self._check_and_project(student, s_mods, inputs)
        except Exception:
            self.close()
            raise

    def _check_and_project(self, student: nn.Module, s_mods: dict[str, nn.Module], inputs: Any) -> None:
        with eval_mode(student), torch.no_grad():
            s_out = as_tensor(call_model(student, inputs))
            t_out = as_tensor(call_model(self.teacher, inputs))
        check(s_out.shape == t_out.shape, "DistillConfig.teacher", f"teacher outputs shape {tuple(t_out.shape)} but the "
              f"student {tuple(s_out.shape)}; the teacher must predict the same classes as the student")
        for s_name, t_name in self.cfg.features.items():
            s, t = self._student[s_name].value, self._teacher[s_name].value
            with torch.random.fork_rng(devices=[]):  # the projection's init is the config's, not the caller's RNG
                torch.manual_seed(self.cfg.seed)
                proj = _projection(s_mods[s_name], s, t, f"{s_name} -> {t_name}")
            self.projections[s_name.replace(".", "__")] = proj.to(s_out.device)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projections.parameters())

    def extra_loss(self, model: nn.Module, inputs: Any, outputs: Any, targets: Any) -> torch.Tensor:
        with torch.no_grad():
            t_out = as_tensor(call_model(self.teacher, inputs))
        s_out = as_tensor(outputs)
        soft_weight = 1.0 if self.cfg.unlabeled else self.cfg.alpha  # no hard loss to mix with
        loss = soft_weight * kd_loss(s_out, t_out, self.cfg.temperature)
        if self.cfg.features and self.cfg.feature_weight > 0:
            loss = loss + self.cfg.feature_weight * self.feature_loss()
        return loss

    def feature_loss(self) -> torch.Tensor:
        """Sum over pairs of MSE(projection(student feature), teacher feature)."""
        return sum(self._pair_losses().values(), 0.0)

    def _pair_losses(self) -> dict[str, torch.Tensor]:
        """student module name -> MSE(projection(student feature), teacher feature), last forward."""
        return {s_name: F.mse_loss(self.projections[s_name.replace(".", "__")](cap.value), self._teacher[s_name].value.detach())
                for s_name, cap in self._student.items()}

    def pair_losses(self, student: nn.Module, inputs: Any) -> dict[str, float]:
        """Each feature pair's loss (unweighted MSE, as trained) on ``inputs``, student and
        teacher in eval mode: the per-layer numbers of the stage info."""
        with eval_mode(student), torch.no_grad():
            call_model(student, inputs)
            call_model(self.teacher, inputs)
            return {name: float(loss) for name, loss in self._pair_losses().items()}

    def close(self) -> None:
        for cap in [*self._student.values(), *self._teacher.values()]:
            cap.handle.remove()
        self._student.clear()
        self._teacher.clear()


def _some(mods: dict[str, nn.Module]) -> str:
    names = [n for n in mods if n][:4]
    return ", ".join(repr(n) for n in names) or "no submodules"


def _resolve_teacher(cfg: DistillConfig, teacher: nn.Module | None) -> nn.Module:
    teacher = teacher if teacher is not None else cfg.teacher
    if isinstance(teacher, str):
        teacher = load_callable(teacher, what="teacher")()
    if not isinstance(teacher, nn.Module):
        raise ConfigError("DistillConfig.teacher: no teacher given; pass an nn.Module (for recovery: the "
                          "uncompressed model) or 'package.module:function'")
    return teacher


@register_stage(DistillConfig)
def apply(model: nn.Module, cfg: DistillConfig, task: Task, teacher: nn.Module | None = None) -> StageResult:
    """Train model (in place) as a student of the teacher on task.train; return it with a record.

    The teacher is never modified (a frozen copy runs in eval mode). Shapes and layer names are
    checked on one batch before any training.
    """
    teacher = copy.deepcopy(_resolve_teacher(cfg, teacher)).requires_grad_(False)
    device = torch.device(cfg.finetune.device) if cfg.finetune.device else default_device()
    model.to(device)
    teacher.to(device).eval()
    # the (unshuffled) test split, so the train loader's shuffling RNG is not advanced
    inputs = task.example_inputs(split="test")
    hook = DistillationHook(teacher, cfg)
    hook.setup(model, to_device(resize_batch(inputs, min(8, batch_size_of(inputs))), device))
    info: dict[str, Any] = {"temperature": cfg.temperature, "alpha": cfg.alpha, "unlabeled": cfg.unlabeled,
                            "features": dict(cfg.features)}
    # per-layer numbers: each feature pair's loss on one fixed test batch before and after training
    probe = to_device(resize_batch(inputs, min(64, batch_size_of(inputs))), device)
    with contextlib.closing(hook):  # the feature hooks are removed whatever happens
        info["teacher_metric"] = task.evaluate(teacher)
        info["student_metric_before"] = task.evaluate(model)
        params = [p for p in model.parameters() if p.requires_grad] + hook.parameters()
        start = hook.pair_losses(model, probe)
        # training_hooks keep earlier compression (pruning masks, fake-quant) intact: recovery
        hooks = [hook, *training_hooks(model)]
        result = fit(model, distill_task(task, cfg.alpha, cfg.unlabeled), cfg.finetune, hooks=hooks, params=params)
        end = hook.pair_losses(model, probe)
    info["layers"] = {s: {"teacher": t, "feature_loss_start": start[s], "feature_loss_end": end[s]}
                      for s, t in cfg.features.items()}
    if not cfg.features:
        info["per_layer"] = "none: logit-only distillation matches no layer pairs (set features for per-layer losses)"
    info["fit"] = result.to_dict()
    info["projection_params"] = sum(p.numel() for p in hook.parameters())
    info["student_metric_after"] = task.evaluate(model)
    return StageResult(model=model, info=info)

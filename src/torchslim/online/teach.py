"""Distillation from a teacher for a window after each drift (issue 15, item 3).

On a drift event the loss of the next ``teacher_batches`` batches becomes
``(1 - teacher_alpha) * task loss + teacher_alpha * T² KL(teacher || student)``, the soft term
being ``torchslim.distill``'s (``DistillationHook`` with ``losses.kd_loss``), so a compressed
model that must re-learn after a drift gets the teacher's full output distribution per sample
rather than one label. Outside the windows the teacher is never run (no cost, and a test checks
it). The teacher is fixed: any model that knows the new data better (e.g. the uncompressed
model fine-tuned on it, a larger model served elsewhere); it is not checkpointed (give the same
one on resume), only the batches left in the window are.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import ConfigError
from ..core.task import load_callable


def resolve_teacher(teacher: Any) -> nn.Module | None:
    """The teacher module: as given, or built by "package.module:function"; None = no teacher."""
    if teacher is None or isinstance(teacher, nn.Module):
        return teacher
    if isinstance(teacher, str):
        built = load_callable(teacher, what="teacher")()
        if isinstance(built, nn.Module):
            return built
    raise ConfigError("OnlineConfig.teacher: must be an nn.Module or 'package.module:function' returning one")


class DriftTeacher:
    """Counts the batches left in the distillation window and gives the mixed loss. The teacher
    module is put in eval mode and its parameters frozen (it is never trained here)."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float, batches: int):
        from ..distillation import DistillationHook, DistillConfig

        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.batches = alpha, batches
        self.hook = DistillationHook(self.teacher, DistillConfig(teacher=self.teacher, alpha=alpha, temperature=temperature))
        self.left = 0
        self.calls = 0  # teacher forward passes (the test checks they happen only after a drift)

    def on_drift(self) -> None:
        self.left = self.batches

    @property
    def active(self) -> bool:
        return self.left > 0

    def loss(self, base: Any, model: nn.Module, inputs: Any, outputs: Any, targets: Any) -> Any:
        """The step's loss: base unchanged outside a window, the mix inside it."""
        if not self.active:
            return base
        self.calls += 1
        return (1 - self.alpha) * base + self.hook.extra_loss(model, inputs, outputs, targets)

    def end_batch(self) -> None:
        self.left = max(self.left - 1, 0)

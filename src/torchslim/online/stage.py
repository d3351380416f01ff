"""``online`` as a recipe stage: learn prequentially from the task's train split as a stream.

Registered for ``OnlineConfig`` so that a recipe stage ``- online: {lr: 0.01}`` (and
``torchslim.core.stage.apply_stage(model, OnlineConfig(...), task)``) runs one pass of online
learning over ``task.train`` (batches in the loader's order, seeded by ``cfg.seed``). The
``torchslim online`` command (``online_app``) is the full form with a ``stream`` block.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import check
from ..core.stage import StageResult, register_stage
from ..core.task import Task
from .config import OnlineConfig
from .loop import online
from .stream import TaskStream


@register_stage(OnlineConfig, copy_input=False)  # online learning is training: in place
def apply(model: nn.Module, cfg: OnlineConfig, task: Task) -> StageResult:
    check(task is not None and task.train is not None, "OnlineConfig", "the online stage needs a task with a train split")
    result = online(model, TaskStream(task, "train", seed=cfg.seed), cfg, loss=task.loss)
    info = result.to_dict()
    info.pop("fingerprint_before"), info.pop("fingerprint_after")
    return StageResult(model, {"online": info})


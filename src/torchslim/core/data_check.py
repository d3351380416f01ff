"""Checks on a task's data and a model's weights before any work (issue 12, point 4).

Each failure is one line naming the split, the batch and what is wrong, raised as a
``TaskError`` (exit code 2 on the command line), instead of a ``StopIteration`` from an empty
split, a ``FloatingPointError`` mid-training, or an accuracy of 0.025 computed against labels
the model cannot produce.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import TaskError
from .task import Task, as_tensor, call_model, resize_batch
from .utils import eval_mode, model_device, to_device

MAX_SCAN_BATCHES = 200  # whole small splits; a bounded prefix of large ones


def _tensors(inputs: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return [("inputs", inputs)]
    if isinstance(inputs, Mapping):
        return [(f"inputs[{k!r}]", v) for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [(f"inputs[{i}]", v) for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
    return []


def check_split(task: Task, split: str, num_classes: int | None, required: bool) -> None:
    """Refuse an empty split, non-finite features and integer labels outside [0, num_classes)."""
    loader = {"train": task.train, "val": task.val, "test": task.test}[split]
    if loader is None:
        if required:
            raise TaskError(f"task {task.name!r}: the {split} split is missing")
        return
    seen = 0
    for i, batch in enumerate(loader):
        if i >= MAX_SCAN_BATCHES:
            break
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TaskError(f"task {task.name!r}: {split} batch {i} is not an (inputs, targets) pair")
        inputs, targets = batch
        for name, t in _tensors(inputs):
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise TaskError(f"task {task.name!r}: {split} batch {i} has {bad} NaN/Inf value(s) in {name}; "
                                "clean or impute the data first")
        if isinstance(targets, torch.Tensor):
            if targets.is_floating_point() and not torch.isfinite(targets).all():
                raise TaskError(f"task {task.name!r}: {split} batch {i} has NaN/Inf targets")
            if num_classes and not targets.is_floating_point() and targets.numel():
                lo, hi = int(targets.min()), int(targets.max())
                if lo < 0 or hi >= num_classes:
                    raise TaskError(f"task {task.name!r}: {split} batch {i} has labels in [{lo}, {hi}] but the "
                                    f"model has {num_classes} outputs (labels must be 0..{num_classes - 1})")
        seen += 1
    if seen == 0:
        raise TaskError(f"task {task.name!r}: the {split} split is empty (0 batches)")


def check_weights(model: nn.Module, what: str = "model") -> None:
    """Refuse NaN/Inf weights (a damaged file or a diverged run), naming the first one."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not torch.isfinite(t.detach()).all():
            bad = int((~torch.isfinite(t.detach())).sum())
            raise TaskError(f"{what}: {name} holds {bad} NaN/Inf value(s); load good weights first")


def model_classes(model: nn.Module, task: Task) -> int | None:
    """Classes of a classification task: task.num_classes, or for a task scored by accuracy the
    outputs per sample of the model's 2-D output; None for other tasks (no label range)."""
    from .task import accuracy

    if task.num_classes:
        return task.num_classes
    if task.metric is not accuracy:
        return None
    try:
        inputs, _ = next(iter(task.test))
        with torch.no_grad(), eval_mode(model):
            out = as_tensor(call_model(model, to_device(resize_batch(inputs, 2), model_device(model))))
    except Exception:  # noqa: BLE001 - check_model reports a model that does not run
        return None
    return int(out.shape[-1]) if out.ndim == 2 else None


def check_task_and_model(task: Task, model: nn.Module, training: bool) -> None:
    """Everything checkable before work: weights finite, splits non-empty, features finite,
    labels in range (train split required when the run trains)."""
    check_weights(model)
    classes = model_classes(model, task)
    check_split(task, "test", classes, required=True)
    check_split(task, "train", classes, required=training)
    check_split(task, "val", classes, required=False)

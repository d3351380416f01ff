"""Model and task zoo: registries of builders by name (``build_model``, ``build_task``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import TaskError
from ..task import Task, load_callable
from . import data, models

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": models.lenet300,
    "lenet5": models.lenet5,
    "rescnn1d": models.rescnn1d,
    "mlp": models.mlp,
}

TASKS: dict[str, Callable[..., Task]] = {
    "digits": data.digits,
    "mnist1d": data.mnist1d,
    "npz": data.npz,
    "csv": data.csv,
}


# zoo models whose builder loads trained weights; the others start from random init
PRETRAINED = {"minilm"}


def register_model(name: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return deco


def register_task(name: str):
    def deco(fn: Callable[..., Task]) -> Callable[..., Task]:
        TASKS[name] = fn
        return fn

    return deco


def build_task(name: str, **kwargs: Any) -> Task:
    """A bundled task by name, or a user's task by ``"package.module:function"``."""
    if ":" in name:
        return Task.from_spec(name, **kwargs)
    _ensure_optional_entries()
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}: choose one of {sorted(TASKS)} or 'package.module:function'")
    return TASKS[name](**kwargs)


def build_model(name: str, task: Task | None = None, **kwargs: Any) -> nn.Module:
    """A zoo model by name sized for task, or a user's model by ``"package.module:function"``."""
    if ":" in name:
        try:
            return load_callable(name, what="model")(**kwargs)
        except TypeError as exc:
            raise TaskError(f"model spec {name!r}: {str(exc).splitlines()[0]}") from None
    _ensure_optional_entries()
    if name not in MODELS:
        raise TaskError(f"unknown model {name!r}: choose one of {sorted(MODELS)} or 'package.module:function'")
    if task is not None and task.input_shape is not None and "in_shape" not in kwargs:
        kwargs["in_shape"] = task.input_shape
    if task is not None and task.num_classes is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = task.num_classes
    try:
        return MODELS[name](**kwargs)
    except (ValueError, TypeError) as exc:
        where = f" for task {task.name!r}" if task is not None else ""
        raise TaskError(f"model {name!r} cannot be built{where}: {str(exc).splitlines()[0]}") from None


def _ensure_optional_entries() -> None:
    """Register entries that need optional packages (MiniLM needs transformers) lazily."""
    if "minilm" in TASKS:
        return
    try:
        from . import minilm  # noqa: F401  (registers 'minilm' task and model)
    except ImportError:
        pass

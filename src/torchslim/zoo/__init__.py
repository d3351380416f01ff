"""Model and task zoo: registries of builders by name (``build_model``, ``build_task``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..core.errors import TaskError
from ..core.task import Task, load_callable
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
    _check_kwargs(TASKS[name], kwargs, f"task {name!r}")
    return TASKS[name](**kwargs)


# sizes a bundled task takes, bounded on both sides (0 hangs or divides by zero; 1e9 exhausts memory)
_SIZE_BOUNDS = {"batch_size": (1, 65_536), "num_samples": (10, 1_000_000), "n_sentences": (1, 100_000),
                "calib_sentences": (0, 100_000), "val_sentences": (0, 100_000), "seed": (0, 2**63 - 1),
                "width": (1, 65_536), "blocks": (1, 1_000), "num_classes": (1, 1_000_000)}


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """kwargs must name parameters of fn, and sizes must be integers within _SIZE_BOUNDS."""
    import inspect

    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise TaskError(f"{what}: unknown kwarg {unknown[0]!r}; it takes {', '.join(params) or 'none'}")
    hidden = kwargs.get("hidden")
    if hidden is not None and not (isinstance(hidden, (list, tuple)) and hidden and all(
            isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 65_536 for h in hidden)):
        raise TaskError(f"{what}: kwargs.hidden must be a non-empty list of layer widths in [1, 65536], got {hidden!r}")
    for key, (low, high) in _SIZE_BOUNDS.items():
        if key in kwargs:
            v = kwargs[key]
            if not (isinstance(v, int) and not isinstance(v, bool) and low <= v <= high):
                raise TaskError(f"{what}: kwargs.{key} must be an integer in [{low}, {high}], got {v!r}")


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
    _check_kwargs(MODELS[name], kwargs, f"model {name!r}")
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
    """Register entries that need optional packages (MiniLM and its text task need transformers)
    lazily."""
    if "minilm" in TASKS and "text_topics" in TASKS:
        return
    try:
        # minilm registers the 'minilm' task and model; text_task 'text_topics' and 'minilm_classifier'
        from . import minilm, text_task  # noqa: F401
    except ImportError:
        pass

"""Task: what a model is for — data splits, loss, metric, example inputs.

A batch is always ``(inputs, targets)``. ``inputs`` is a Tensor (called as ``model(x)``) or a
dict of Tensors (called as ``model(**x)``, e.g. a tokenizer's output). The metric is computed
once per split on the concatenated outputs and targets, so set-level metrics (e.g. nearest-
neighbour agreement) work as well as per-sample ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .errors import TaskError
from .utils import batch_size_of, eval_mode, model_device, to_device

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits against integer class targets, in [0, 1]."""
    return (outputs.argmax(dim=-1) == targets).float().mean().item()


def tensor_loss(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The task's loss, given the model's output as a Tensor, exactly as the metric is: a Hugging
    Face ``ModelOutput`` (its logits), a tuple (its first element) or a dict ("logits" and the
    other keys ``as_tensor`` knows) is reduced by ``as_tensor`` first, so the default
    ``F.cross_entropy`` and a user's ``lambda out, y: ...`` both see logits. (A loss that needs
    every head of a dict output belongs in a model wrapper that returns one tensor.)"""
    if getattr(fn, "_torchslim_tensor_loss", False):
        return fn

    def loss(outputs: Any, targets: Any) -> torch.Tensor:
        return fn(outputs if isinstance(outputs, torch.Tensor) else as_tensor(outputs), targets)

    loss._torchslim_tensor_loss = True  # type: ignore[attr-defined]
    loss.__wrapped__ = fn  # type: ignore[attr-defined]
    loss.__name__ = getattr(fn, "__name__", "loss")
    return loss


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run model on a batch's inputs (Tensor -> model(x); dict -> model(**x))."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


@dataclass
class Task:
    """Data, loss and metric for one problem.

    name: short identifier used in reports.
    train/val/test: DataLoaders yielding ``(inputs, targets)``; train and val may be None for
        evaluation-only tasks (e.g. fidelity to a reference model).
    loss: ``loss(outputs, targets) -> scalar Tensor`` used for training.
    metric: ``metric(outputs, targets) -> float`` (higher is better) on a whole split.
    extra_metrics: further named metrics reported by ``measure`` (not used for decisions).
    num_classes / input_shape: informative, used by the zoo to build matching models.
    """

    name: str
    test: DataLoader
    train: DataLoader | None = None
    val: DataLoader | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric: Metric = accuracy
    metric_name: str = "accuracy"
    extra_metrics: dict[str, Metric] = field(default_factory=dict)
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.loss = tensor_loss(self.loss)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def from_spec(spec: str, **kwargs: Any) -> Task:
        """Load a user's task from ``"package.module:function"``; the function returns a Task."""
        fn = load_callable(spec, what="task")
        task = fn(**kwargs)
        if not isinstance(task, Task):
            raise TaskError(
                f"task spec {spec!r}: {fn.__name__}() returned {type(task).__name__}, "
                "expected torchslim.Task"
            )
        return task

    # ------------------------------------------------------------------ helpers
    def split(self, name: str) -> DataLoader:
        loader = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if loader is None:
            raise TaskError(f"task {self.name!r} has no {name!r} split")
        return loader

    def example_inputs(self, batch_size: int | None = None, split: str = "test") -> Any:
        """One batch of inputs (repeated/cut to batch_size if given), for MACs/latency/export."""
        inputs, _ = next(iter(self.split(split)))
        if batch_size is None:
            return inputs
        return resize_batch(inputs, batch_size)

    @torch.no_grad()
    def outputs_and_targets(
        self, model: nn.Module, split: str = "test", max_batches: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = model_device(model)
        outs, tgts = [], []
        with eval_mode(model):
            for i, (inputs, targets) in enumerate(self.split(split)):
                if max_batches is not None and i >= max_batches:
                    break
                out = call_model(model, to_device(inputs, device))
                outs.append(as_tensor(out).float().cpu())
                tgts.append(targets.cpu())
        return torch.cat(outs), torch.cat(tgts)

    def evaluate(self, model: nn.Module, split: str = "test") -> float:
        """The task's metric of model on split."""
        outputs, targets = self.outputs_and_targets(model, split)
        return float(self.metric(outputs, targets))

    def evaluate_all(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        outputs, targets = self.outputs_and_targets(model, split)
        result = {self.metric_name: float(self.metric(outputs, targets))}
        for name, fn in self.extra_metrics.items():
            result[name] = float(fn(outputs, targets))
        return result

    def check_model(self, model: nn.Module) -> None:
        """Run one small batch through model, loss and metric; TaskError if they do not fit."""
        inputs, targets = next(iter(self.test))
        n = min(4, batch_size_of(inputs))
        inputs, targets = resize_batch(inputs, n), targets[:n]
        device = model_device(model)
        try:
            with torch.no_grad(), eval_mode(model):
                out = as_tensor(call_model(model, to_device(inputs, device))).float().cpu()
                if self.num_classes is not None and out.ndim == 2 and out.shape[1] != self.num_classes:
                    raise TaskError(
                        f"model does not fit task {self.name!r}: it outputs {out.shape[1]} values per "
                        f"sample, the task has {self.num_classes} classes"
                    )
                self.loss(out, targets)
                self.metric(out, targets)
        except TaskError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means "does not fit"
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise TaskError(
                f"model does not fit task {self.name!r} (inputs {_describe(inputs)}, targets "
                f"{tuple(targets.shape)}): {type(exc).__name__}: {first}"
            ) from None


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import ``"package.module:attr"`` with a one-line error naming what went wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise TaskError(f"{what} spec {spec!r}: expected 'package.module:function'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"{what} spec {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise TaskError(f"{what} spec {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def as_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "sentence_embedding", "last_hidden_state"):
        if isinstance(out, Mapping) and key in out:
            return out[key]
        if hasattr(out, key):
            return getattr(out, key)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TaskError(f"model output of type {type(out).__name__} is not a Tensor")


def resize_batch(inputs: Any, n: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        reps = -(-n // inputs.shape[0])
        return inputs.repeat(reps, *([1] * (inputs.ndim - 1)))[:n] if reps > 1 else inputs[:n]
    if isinstance(inputs, Mapping):
        return {k: resize_batch(v, n) for k, v in inputs.items()}
    return type(inputs)(resize_batch(v, n) for v in inputs)


def _describe(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__

"""Stage registry: a technique's config type -> its ``apply(model, config, task)``.

The recipe runner and the CLI know techniques only through this table (as torchao's
``quantize_`` knows schemes through a handler registry keyed by config type). Adding a technique
is one config dataclass plus one decorated function; the runner never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError
from .task import Task


@dataclass
class StageResult:
    """What a stage gives back: the new model and a per-layer/per-step record of what changed.

    save: optional ``save(model, path)`` writing the technique's compact on-disk format (sparse
    storage, archive, int8 file); the runner and ``measure`` use it to report real bytes.
    """

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    save: Callable[[nn.Module, str], None] | None = None


Apply = Callable[[nn.Module, Any, Task], StageResult]
STAGES: dict[type, Apply] = {}


def register_stage(config_type: type) -> Callable[[Apply], Apply]:
    def deco(fn: Apply) -> Apply:
        STAGES[config_type] = fn
        return fn

    return deco


def apply_stage(model: nn.Module, config: Any, task: Task) -> StageResult:
    fn = STAGES.get(type(config))
    if fn is None:
        known = ", ".join(sorted(t.__name__ for t in STAGES)) or "none registered"
        raise ConfigError(f"stage config {type(config).__name__}: no technique registered for it (known: {known})")
    return fn(model, config, task)

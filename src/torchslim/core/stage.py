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

from .compression_hooks import (  # noqa: F401 - re-exported: the registry's public names
    _MISSING,
    HOOK_PROVIDERS,
    TECHNIQUE_MODULES,
    load_techniques,
    register_training_hooks,
    training_hooks,
)
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
# config types whose apply must not receive a copy: it already builds its result on its own copy
# of the input, or it trains in place (train, online) by the in-place rule below
NO_COPY: set[type] = set()


def register_stage(config_type: type, copy_input: bool = True) -> Callable[[Apply], Apply]:
    """Register ``apply`` for ``config_type``. ``copy_input=False`` for a technique that never
    modifies its input itself (it copies first) or that trains in place."""
    def deco(fn: Apply) -> Apply:
        STAGES[config_type] = fn
        if copy_input:
            NO_COPY.discard(config_type)
        else:
            NO_COPY.add(config_type)
        return fn

    return deco


def apply_stage(model: nn.Module, config: Any, task: Task) -> StageResult:
    """Run the technique registered for ``type(config)`` on a copy of model.

    The one in-place rule: a compression stage never modifies the model it is given; it
    returns a new one in ``StageResult.model`` (the input stays usable as the reference or
    teacher). Training (``fit``, and a ``train`` stage) updates the model in place, as
    ``torch.optim`` does. Every public entry point (``torchslim.prune``, ``quantize``,
    ``cluster``, ``factorize``, ``distill``, recipes) goes through here."""
    fn = STAGES.get(type(config))
    if fn is None:
        known = ", ".join(sorted(t.__name__ for t in STAGES)) or "none registered"
        raise ConfigError(f"stage config {type(config).__name__}: no technique registered for it (known: {known})")
    if type(config) not in NO_COPY:
        import copy

        model = copy.deepcopy(model)
    return fn(model, config, task)


def stage_name(config_type: type) -> str:
    """Recipe key of a technique: PruneConfig -> prune, StructuredPruneConfig -> structured_prune,
    or the name the config declares itself (``@config(stage="quantize")``: one place, next to it)."""
    import re

    declared = config_type.__dict__.get("__stage_name__")
    if declared is not None:
        return declared
    base = config_type.__name__.removesuffix("Config")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()


def stage_names() -> dict[str, type]:
    """Recipe key -> config type for every registered technique."""
    load_techniques()
    return {stage_name(t): t for t in STAGES}


def _finetune(model: nn.Module, config: Any, task: Task) -> StageResult:
    from .train import fit

    result = fit(model, task, config, hooks=training_hooks(model))
    return StageResult(model, {"fit": result.to_dict()})


def _register_finetune() -> None:
    from .train import TrainConfig

    if TrainConfig not in STAGES:
        register_stage(TrainConfig, copy_input=False)(_finetune)  # training: in place


_register_finetune()


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


# Modules whose import registers a technique; optional ones may be missing their extras.
TECHNIQUE_MODULES = (
    "torchslim.prune", "torchslim.quantize", "torchslim.share", "torchslim.distill", "torchslim.lowrank",
)


def load_techniques() -> None:
    """Import every technique module so that its stage is registered (idempotent)."""
    import importlib

    for name in TECHNIQUE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional dependency is missing: that technique is absent
            _MISSING[name] = str(exc)


_MISSING: dict[str, str] = {}


_ALIASES = {"NMConfig": "nm", "QuantConfig": "quantize", "LowRankConfig": "lowrank", "TrainConfig": "train"}


def stage_name(config_type: type) -> str:
    """Recipe key of a technique: PruneConfig -> prune, StructuredPruneConfig -> structured_prune."""
    import re

    if config_type.__name__ in _ALIASES:
        return _ALIASES[config_type.__name__]
    base = config_type.__name__.removesuffix("Config")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()


def stage_names() -> dict[str, type]:
    """Recipe key -> config type for every registered technique."""
    load_techniques()
    return {stage_name(t): t for t in STAGES}


# Techniques whose compression must survive later training register a provider here:
# ``provider(model) -> list of fit hooks`` (e.g. pruning returns a MaskKeeper when masks exist).
HOOK_PROVIDERS: list[Callable[[nn.Module], list]] = []


def register_training_hooks(provider: Callable[[nn.Module], list]) -> Callable[[nn.Module], list]:
    HOOK_PROVIDERS.append(provider)
    return provider


def training_hooks(model: nn.Module) -> list:
    """Hooks that keep every applied compression intact while ``model`` is trained further."""
    load_techniques()
    return [h for provider in HOOK_PROVIDERS for h in provider(model)]


def _finetune(model: nn.Module, config: Any, task: Task) -> StageResult:
    from .train import fit

    result = fit(model, task, config, hooks=training_hooks(model))
    return StageResult(model, {"fit": result.to_dict()})


def _register_finetune() -> None:
    from .train import TrainConfig

    STAGES.setdefault(TrainConfig, _finetune)


_register_finetune()


def make_callable_module(module_name: str, fn: Callable[..., Any]) -> None:
    """Let ``torchslim.prune(model, cfg, task)`` call ``fn`` while ``torchslim.prune`` stays the
    package (so ``import torchslim.prune.masks`` keeps working)."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule

"""Which techniques exist and which fit hooks keep their compression (a leaf module: it imports
no torchslim module statically, so train.py and stage.py can both use it without a cycle)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# Modules whose import registers a technique; optional ones may be missing their extras.
TECHNIQUE_MODULES = (
    "torchslim.pruning", "torchslim.quantization", "torchslim.sharing", "torchslim.distillation", "torchslim.lowrank",
    "torchslim.online", "torchslim.dynamic",
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



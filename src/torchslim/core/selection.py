"""One layer selection for every technique (issue 11, item 2): ``LayerSelection`` under the one
field name ``layers`` in every technique config, and ``select_layers`` used by all.

A recipe writes either a list of glob patterns (= ``include``) or a mapping::

    layers: ["features.*"]
    layers: {include: ["features.*"], exclude: ["*.downsample.*"], types: [Conv2d, Linear]}

``types`` are module class names (or, from Python, classes, matched with ``isinstance``);
``None`` means the technique's own default kinds (the named tuples below). ``filter_fn(module,
name) -> bool`` narrows the selection further, from Python only (as torchao's ``filter_fn``).
What a technique then cannot handle (a tied weight, a recurrent layer) it reports as skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import field
from typing import Annotated, Any

from pydantic import BeforeValidator
from torch import nn

from .config_base import config
from .errors import check

# The technique defaults, next to the one selector (None = any module holding a weight).
PRUNABLE = ("Linear", "Conv1d", "Conv2d", "Conv3d")  # unstructured and N:M pruning
FACTORIZABLE = ("Linear", "Conv1d", "Conv2d", "Conv3d")  # low-rank (groups == 1 checked there)
ANY_WEIGHT = None  # weight sharing, quantization, structured pruning: their own rules decide


@config
class LayerSelection:
    """include: glob patterns on module names (default every module).
    exclude: glob patterns removed from what include selects.
    types: module class names (e.g. [Linear, Conv2d]); None = the technique's default kinds.
    filter_fn: ``filter_fn(module, name) -> bool``, Python only (not in recipes)."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[str | type, ...] | None = None
    filter_fn: Callable[[nn.Module, str], bool] | None = None

    def __post_init__(self) -> None:
        check(len(self.include) > 0, "LayerSelection.include", "must not be empty (nothing would be selected); "
              "leave it out to select every layer")
        check(self.types is None or len(self.types) > 0, "LayerSelection.types",
              "must not be empty; leave it out (null) for the technique's default kinds")

    def named(self, name: str) -> bool:
        """True when ``name`` passes include/exclude (the name part of the selection)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def kind_ok(self, module: nn.Module, name: str, default_types: tuple[str, ...] | None = None) -> bool:
        """True when ``module`` passes types (else ``default_types``) and filter_fn."""
        types = self.types if self.types is not None else default_types
        if types is not None and not any(
                type(module).__name__ == t if isinstance(t, str) else isinstance(module, t) for t in types):
            return False
        return self.filter_fn is None or bool(self.filter_fn(module, name))

    def matches(self, name: str, module: nn.Module, default_types: tuple[str, ...] | None = None) -> bool:
        return self.named(name) and self.kind_ok(module, name, default_types)

    def describe(self) -> str:
        parts = [f"include={list(self.include)}"]
        parts += [f"exclude={list(self.exclude)}"] if self.exclude else []
        parts += [f"types={[getattr(t, '__name__', t) for t in self.types]}"] if self.types else []
        parts += ["filter_fn"] if self.filter_fn is not None else []
        return "layers: " + ", ".join(parts)


def _as_selection(value: Any) -> Any:
    """``None`` = everything, a string or a list = include patterns, else a mapping/object."""
    if value is None:
        return LayerSelection()
    if isinstance(value, str):
        return LayerSelection(include=(value,))
    if isinstance(value, (list, tuple)):
        return LayerSelection(include=tuple(value))
    return value


Layers = Annotated[LayerSelection, BeforeValidator(_as_selection)]


def layers_field(**defaults: Any) -> Any:
    """The ``layers`` field of a technique config (default: every layer of the default kinds)."""
    return field(default_factory=lambda: LayerSelection(**defaults))


def select_layers(model: nn.Module, selection: LayerSelection,
                  default_types: tuple[str, ...] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module the selection picks, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if selection.matches(n, m, default_types)]

"""Bounds on both sides for every numeric config field, written once, next to the field.

``bounded(default, low, high)`` is a ``dataclasses.field`` carrying its ``Range``. The one config
contract (``torchslim.core.config_base.config``) turns each declared range into pydantic constraints
on the field's type (strict number, finite, ``Ge``/``Gt`` and ``Le``/``Lt``), so a bool, a string,
NaN, inf or an out-of-range value is refused by pydantic at construction, with one line naming the
field and the range. ``check_bounds(cfg)`` is the same rule as a plain function (kept for callers
that check a config built without the contract).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

# The widest a count may be: larger values are typos (or fuzz) that would hang or exhaust memory.
MAX_COUNT = 10**6
MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = False
    optional: bool = False  # None allowed
    low_open: bool = False
    high_open: bool = False

    def text(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        fmt = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        return f"{kind} in {lo}{fmt(self.low)}, {fmt(self.high)}{hi}" + (" or null" if self.optional else "")

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


    def constraints(self) -> tuple[Any, ...]:
        """The range as pydantic / annotated_types constraints (used by config_base)."""
        import annotated_types as at

        low = at.Gt(self.low) if self.low_open else at.Ge(self.low)
        high = at.Lt(self.high) if self.high_open else at.Le(self.high)
        return (low, high)


def bounded(default: Any, low: float, high: float, *, integer: bool = False, optional: bool = False,
            low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field whose value must lie in [low, high] (ends open on request)."""
    rng = Range(low, high, integer, optional or default is None, low_open, high_open)
    return dataclasses.field(default=default, metadata={"range": rng})


def count(default: Any, low: int = 1, high: int = MAX_COUNT, optional: bool = False) -> Any:
    """An integer count field (batches, steps, iterations), [low, high]."""
    return bounded(default, low, high, integer=True, optional=optional)


def seed_field(default: int = 0) -> Any:
    return bounded(default, 0, MAX_SEED, integer=True)


def fraction(default: Any, *, low_open: bool = False, high_open: bool = False, optional: bool = False) -> Any:
    """A fraction in [0, 1] (ends open on request)."""
    return bounded(default, 0.0, 1.0, low_open=low_open, high_open=high_open, optional=optional)


def range_of(cls: type, name: str) -> Range | None:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("range")
    return None


def check_bounds(cfg: Any) -> None:
    """ConfigError naming the first field of ``cfg`` outside its declared range."""
    for f in dataclasses.fields(cfg):
        rng = f.metadata.get("range")
        if rng is None:
            continue
        value = getattr(cfg, f.name)
        if not rng.holds(value):
            raise ConfigError(f"{type(cfg).__name__}.{f.name}: must be {rng.text()}, got {value!r}")

"""``torchslim stages [NAME]``: every recipe stage with its fields, defaults, ranges and docs,
read from the stage registry and the config dataclasses (nothing here is written by hand, so
it cannot drift from the code)."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any

from ..core.bounds import range_of
from ..core.errors import ConfigError
from ..core.stage import stage_names


def _type_text(tp: Any) -> str:
    """A field type as written, without the contract's constraints: ``float | None``,
    ``dict[str, float]``, ``LayerSelection`` (ranges are their own column)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if tp is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is not None and args:
        inner = ", ".join("..." if a is Ellipsis else _type_text(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin).replace('typing.', ''))}[{inner}]"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return repr(value) if not dataclasses.is_dataclass(value) else f"{type(value).__name__}()"
    return "(required)"


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its line(s) in the class docstring (``name: text`` or ``a / b: text``)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in doc.splitlines():
        head, sep, rest = line.partition(":")
        names = [n.strip() for n in head.split("/")] if sep and not line.startswith(" ") else []
        if names and all(n.isidentifier() for n in names):
            current = names
            for n in names:
                out[n] = rest.strip()
        elif current and line.startswith(" ") and line.strip():
            for n in current:
                out[n] += " " + line.strip()
        else:
            current = []
    return out


def describe(name: str) -> list[dict[str, str]]:
    """One dict per field of stage ``name``: field, type, default, range, doc."""
    stages = stage_names()
    if name not in stages:
        raise ConfigError(f"stages: no stage named {name!r}; known: {', '.join(sorted(stages))}")
    cls = stages[name]
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = _field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        rng = range_of(cls, f.name)
        rows.append({"field": f.name, "type": _type_text(hints.get(f.name, f.type)), "default": _default(f),
                     "range": rng.text().removeprefix("an integer in ").removeprefix("a finite number in ") if rng else "",
                     "doc": docs.get(f.name, "")})
    return rows


def stages_table(name: str | None = None):
    from rich.markup import escape
    from rich.table import Table

    if name is None:
        table = Table(title="recipe stages (torchslim stages NAME shows one stage's fields)")
        for col in ("stage", "config", "what it does"):
            table.add_column(col)
        for key, cls in sorted(stage_names().items()):
            first = (inspect.getdoc(cls) or "").strip().splitlines()
            table.add_row(key, cls.__name__, escape(first[0]) if first else "")
        return table
    table = Table(title=f"stage {name!r} ({stage_names()[name].__name__ if name in stage_names() else '?'})")
    for col in ("field", "type", "default", "range", "doc"):
        table.add_column(col, overflow="fold")
    for row in describe(name):
        table.add_row(*(escape(v) for v in row.values()))  # "dict[str, float]" is not markup
    return table

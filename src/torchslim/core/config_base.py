"""The one config contract (issue 11, item 1): every technique config is declared with ``@config``.

``@config`` makes the class a pydantic (v2) dataclass with ``extra="forbid"``, so the dataclass
protocol (``dataclasses.fields``, ``replace``, ``asdict``) keeps working while pydantic validates
every construction -- from Python, from a recipe, or from ``from_dict``:

- numbers are strict (a bool or a string is not a number), floats are finite (no NaN, no inf),
  and each range declared once with ``bounds.bounded/count/fraction/seed_field`` becomes pydantic
  constraints (``Ge``/``Gt``, ``Le``/``Lt``) on the field's type; bools are strict too;
- an unknown keyword is refused; an old (renamed) keyword is refused with the new spelling
  (``@config(renamed={"include": "layers: {include: [...]}"})``);
- pydantic's error becomes our one line, ``ConfigError("<Config>.<field>: <what> — <fix>")``
  (the CLI prints it and exits with code 2); the class's own ``__post_init__`` keeps the
  cross-field rules and runs after pydantic's checks.

``to_dict(cfg)`` / ``from_dict(cls, data)`` round-trip a config through plain JSON/YAML data;
``SCHEMA_VERSION`` is the version a recipe may state as ``schema: 1`` (``check_schema``).

Why a decorator that rewrites annotations instead of writing ``Annotated[...]`` on each field:
the declarations stay one line (``bits: int = bounded(8, 2, 8, integer=True)``) and the range
exists once, read both by pydantic and by ``torchslim stages``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import types
import typing
from typing import Annotated, Any, Union

import pydantic
import pydantic.dataclasses
import pydantic_core
from pydantic import ConfigDict, Strict, TypeAdapter, ValidationError

from .bounds import Range
from .errors import ConfigError

SCHEMA_VERSION = 1
PYDANTIC_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
_FINITE = pydantic.AllowInfNan(False)
_CONTAINERS = (dict, list, tuple, set, frozenset)


def config(cls: type | None = None, /, *, renamed: dict[str, str] | None = None, stage: str | None = None) -> Any:
    """Declare a technique config: ``@config``, or ``@config(renamed={old: "new spelling"},
    stage="quantize")`` (``stage``: its recipe key when not derived from the class name,
    ``StructuredPruneConfig`` -> ``structured_prune``)."""

    def wrap(c: type) -> type:
        _constrain(c)
        pc = pydantic.dataclasses.dataclass(c, config=PYDANTIC_CONFIG)
        pc.__renamed__ = {**getattr(pc, "__renamed__", {}), **(renamed or {})}
        if stage is not None:
            pc.__stage_name__ = stage
        _wrap_init(pc)
        return pc

    return wrap(cls) if cls is not None else wrap


def is_config(obj: Any) -> bool:
    """True for a class declared with ``@config`` (or an instance of one)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return "__renamed__" in cls.__dict__ and dataclasses.is_dataclass(cls)


# ----------------------------------------------------------------------------- annotations
def _constrain(cls: type) -> None:
    """Replace each own annotation by its strict, finite, range-constrained form."""
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - edited in place, before pydantic reads it
    module = sys.modules.get(cls.__module__)
    ns = dict(vars(module)) if module else {}
    ns.setdefault(cls.__name__, cls)
    for name, ann in list(own.items()):
        hint = _resolve(ann, ns)
        if hint is None:
            continue  # left to pydantic (a forward reference it resolves later)
        default = cls.__dict__.get(name, dataclasses.MISSING)
        rng = default.metadata.get("range") if isinstance(default, dataclasses.Field) else None
        own[name] = _strict(hint, rng)


def _resolve(ann: Any, ns: dict[str, Any]) -> Any:
    if not isinstance(ann, str):
        return ann
    try:
        return eval(ann, ns)  # the class's own annotation text, in its own module
    except Exception:  # noqa: BLE001 - unresolvable now: pydantic resolves (or reports) it
        return None


def _strict(hint: Any, rng: Range | None) -> Any:
    """int/float/bool anywhere in ``hint`` -> strict (and finite); ``rng`` bounds the numbers."""
    if hint is bool:
        return Annotated[bool, Strict()]
    if hint is int:
        return Annotated[(int, Strict(), *(rng.constraints() if rng else ()))]
    if hint is float:
        return Annotated[(float, Strict(), _FINITE, *(rng.constraints() if rng else ()))]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated or not args:
        return hint
    if origin in (Union, types.UnionType):
        return Union[tuple(_strict(a, rng) for a in args)]  # noqa: UP007 - built from a tuple
    if origin in _CONTAINERS:
        return origin[tuple(a if a is Ellipsis else _strict(a, None) for a in args)]
    return hint


# ----------------------------------------------------------------------------- errors
def _wrap_init(cls: type) -> None:
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        refuse_renamed(type(self), kwargs)
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(error_line(type(self), exc)) from None

    cls.__init__ = __init__


def refuse_renamed(cls: type, data: dict[str, Any], prefix: str | None = None) -> None:
    """An old key is refused in one line naming the new one."""
    for old, new in getattr(cls, "__renamed__", {}).items():
        if old in data:
            raise ConfigError(f"{prefix or cls.__name__}.{old}: renamed — write {new}")


def error_line(cls: type, exc: ValidationError) -> str:
    """pydantic's first error as ``<Config>.<field>: <what> — <fix>`` (one line)."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]
    where = cls.__name__ + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc)
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, ConfigError):  # a __post_init__ rule, maybe of a nested config
        msg = str(inner)
        if loc and ": " in msg:
            owner, _, rest = msg.partition(": ")
            field = owner.split(".", 1)[1] if "." in owner else owner
            return f"{where}.{field}: {rest}"
        return msg if not loc else f"{where}: {msg}"
    owner, name = _owner(cls, loc)
    value = err.get("input")
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = ", ".join(f.name for f in dataclasses.fields(owner)) if owner else "see torchslim stages"
        extra = f" of {owner.__name__}" if owner else ""
        return f"{where}: unknown field{extra} — use one of: {known}"[:400]
    if err["type"] in ("missing_argument", "missing"):
        return f"{where}: required — set it"
    rng = _range(owner, name)
    if rng is not None and err["type"] not in ("value_error", "assertion_error"):
        return f"{where}: must be {rng.text()}, got {value!r}"[:300]
    text = err["msg"].removeprefix("Value error, ")
    text = text[0].lower() + text[1:] if text else text
    return f"{where}: {text}, got {value!r}"[:300]


# pydantic names the member of a union that failed in the error's location ("bits.int",
# "teacher.is-instance[Module]"); the user wrote "bits", so those tags are dropped
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|list|tuple|dict|set|frozenset|type|callable|is-instance|is-subclass|"
                        r"function-[a-z]+|lax-or-strict|json-or-python|nullable|constrained-[a-z]+)(\[.*\])?$")


def _owner(cls: type, loc: list[str]) -> tuple[type | None, str | None]:
    """The dataclass that declares the field at ``loc`` (nested configs followed) and its name."""
    owner: Any = cls
    names = [p for p in loc if not p.isdigit()]
    for part in names[:-1]:
        hints = _hints(owner)
        nested = [a for a in (typing.get_args(hints.get(part)) or (hints.get(part),))
                  if isinstance(a, type) and dataclasses.is_dataclass(a)]
        owner = nested[0] if nested else None
        if owner is None:
            return None, None
    return owner, (names[-1] if names else None)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - only used to name nested fields in messages
        return {}


def _range(owner: type | None, name: str | None) -> Range | None:
    if owner is None or name is None:
        return None
    for f in dataclasses.fields(owner):
        if f.name == name:
            return f.metadata.get("range")
    return None


# ----------------------------------------------------------------------------- round trip
@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON/YAML data (tuples -> lists, nested configs -> mappings).

    A field holding a Python object (a module, a function) has no data form: ConfigError."""
    try:
        return _adapter(type(cfg)).dump_python(cfg, mode="json")
    except pydantic_core.PydanticSerializationError as exc:
        raise ConfigError(f"{type(cfg).__name__}: holds a Python object that has no JSON/YAML form "
                          f"({str(exc).splitlines()[0][:120]}) — set that field from Python only") from None


def from_dict(cls: type, data: Any, path: str | None = None) -> Any:
    """Build config ``cls`` from a mapping, validated by the contract (errors name ``path``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
    if not is_config(cls):  # a plain dataclass: pydantic validates it the same way
        try:
            return _adapter(cls).validate_python(data)
        except ValidationError as exc:
            raise ConfigError(error_line(cls, exc)) from None
    return cls(**data)


def check_schema(data: dict[str, Any], where: str = "recipe") -> None:
    """``schema:`` missing = 1; a newer version than this torchslim reads is refused in one line."""
    version = data.get("schema", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"{where}.schema: must be a positive integer (the recipe format version), got {version!r}")
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{where}.schema: version {version} is newer than this torchslim reads "
                          f"({SCHEMA_VERSION}) — upgrade torchslim, or write schema: {SCHEMA_VERSION}")

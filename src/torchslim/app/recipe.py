"""Recipe schema: YAML/JSON -> validated task, model and stage configs, before any work starts.

A recipe names a task and a model (zoo names or ``package.module:function``), a seed, an
optional baseline training budget, and an ordered list of stages. Each stage is a mapping with
exactly one technique key (the technique's registered name, e.g. ``prune``, ``share``,
``quant``) whose value holds that technique's config fields, plus an optional ``finetune``
block (TrainConfig fields) run after the technique and an optional ``name``.

``schema: 1`` states the recipe format version (missing = 1; a newer one is refused in one line).
Each stage config is built through the one config contract (``torchslim.core.config_base``), so a
recipe and Python construction validate identically. Every error is one line naming the path
inside the recipe, e.g.
``stages[2].prune.sparsity: must be in [0, 1), got 1.3``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.config_base import check_schema, from_dict
from ..core.errors import ConfigError, TorchslimError
from ..core.stage import stage_names
from ..core.train import TrainConfig

EXPORTS = ("safetensors", "onnx", "archive")


class RecipeError(TorchslimError):
    """A recipe is invalid; the message starts with the path inside the recipe."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class TaskSpec(_Strict):
    name: str
    kwargs: dict[str, Any] = {}


class ModelSpec(_Strict):
    name: str
    weights: str | None = None
    kwargs: dict[str, Any] = {}


class MeasureSpec(_Strict):
    batch_size: int = Field(256, ge=1, le=65_536, strict=True)
    threads: int | None = Field(None, ge=1, le=1024, strict=True)
    repeats: int = Field(20, ge=1, le=10_000, strict=True)


class GuardSpec(_Strict):
    """Quality guard, on by default: a stage whose metric is more than ``max_drop`` below the
    baseline's (absolute, in metric units: 0.02 = 2 points of accuracy) is flagged in the table,
    the report and run.json; with ``error: true`` the run stops there (exit code 2)."""

    max_drop: float = Field(0.02, ge=0.0, le=1.0)
    error: bool = False


class RecipeSpec(_Strict):
    """The raw recipe as written (stages still as mappings)."""

    task: str | TaskSpec
    model: str | ModelSpec
    seed: int = Field(0, ge=0, le=2**63 - 1, strict=True)
    train: dict[str, Any] | None = None
    stages: list[dict[str, Any]] = []
    export: list[str] = []
    measure: MeasureSpec = MeasureSpec()
    guard: GuardSpec = GuardSpec()
    # modules this recipe imports code from ("pkg.mod:fn" specs); approved by --trust-code
    trust_code: list[str] = []
    out: str | None = None
    name: str | None = None


@dataclasses.dataclass
class Stage:
    name: str
    technique: str
    config: Any
    finetune: TrainConfig | None = None


def code_specs(source: dict[str, Any]) -> list[str]:
    """Every 'package.module:function' a recipe names (task, model, distillation teacher):
    each one is imported and called, i.e. runs code of the recipe author's choosing."""
    found = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif isinstance(obj, str) and (path.endswith(("task", "task.name", "model", "model.name", "teacher"))
                                       and obj.count(":") == 1 and "/" not in obj):
            found.append(obj)

    walk(source, "")
    return found


@dataclasses.dataclass
class Recipe:
    spec: RecipeSpec
    task: TaskSpec
    model: ModelSpec
    train: TrainConfig | None
    stages: list[Stage]
    source: dict[str, Any]


def load_recipe(path_or_data: str | Path | dict[str, Any]) -> Recipe:
    """Read (YAML or JSON file, or a dict) and validate a whole recipe."""
    data = read_recipe_file(path_or_data) if not isinstance(path_or_data, dict) else path_or_data
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: must be a mapping with keys task, model, stages, got {type(data).__name__}")
    for key, command in (("search", "torchslim search"), ("stream", "torchslim online")):
        _check(key not in data, key, f"this recipe is for `{command}` (its {key!r} block); `torchslim run` "
               "takes recipes without one")
    try:
        check_schema(data)
    except ConfigError as exc:
        raise RecipeError(str(exc).removeprefix("recipe.")) from None
    try:
        spec = RecipeSpec.model_validate({k: v for k, v in data.items() if k != "schema"})
    except ValidationError as exc:
        raise RecipeError(_pydantic_message(exc)) from None
    task = spec.task if isinstance(spec.task, TaskSpec) else TaskSpec(name=spec.task)
    model = spec.model if isinstance(spec.model, ModelSpec) else ModelSpec(name=spec.model)
    _check(spec.measure.batch_size >= 1, "measure.batch_size", f"must be >= 1, got {spec.measure.batch_size}")
    _check(spec.measure.repeats >= 1, "measure.repeats", f"must be >= 1, got {spec.measure.repeats}")
    _check(spec.measure.threads is None or spec.measure.threads >= 1, "measure.threads", "must be >= 1 or null")
    for i, e in enumerate(spec.export):
        _check(e in EXPORTS, f"export[{i}]", f"unknown export {e!r}; use one of {', '.join(EXPORTS)}")
    train = build_dataclass(TrainConfig, spec.train, "train") if spec.train is not None else None
    stages = [_build_stage(raw, f"stages[{i}]", i) for i, raw in enumerate(spec.stages)]
    _dedupe_names(stages)
    return Recipe(spec, task, model, train, stages, data)


MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: a recipe is a page of settings, not data
MAX_ALIASES = 64  # YAML aliases (*ref); a "billion laughs" bomb needs thousands
MAX_DEPTH = 32  # nesting of mappings/lists
MAX_VALUES = 100_000  # values after aliases are expanded (run.json writes them out)


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys, alias bombs and deep nesting."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise RecipeError(f"recipe: more than {MAX_ALIASES} YAML aliases (*ref); write the values out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RecipeError(f"recipe: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise RecipeError(f"recipe line {key_node.start_mark.line + 1}: a key must be a plain value")
            if key in seen:
                raise RecipeError(f"recipe line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise RecipeError(f"recipe: duplicate key {k!r}")
        out[k] = v
    return out


def _depth(obj: Any, limit: int = MAX_DEPTH) -> None:
    stack, seen = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise RecipeError(f"recipe: expands to more than {MAX_VALUES:,} values (YAML aliases?); write it out plainly")
        if d > limit:
            raise RecipeError(f"recipe: nested more than {limit} levels deep")
        if isinstance(o, dict):
            stack += [(v, d + 1) for v in o.values()]
        elif isinstance(o, list):
            stack += [(v, d + 1) for v in o]


def read_recipe_file(path: str | Path) -> Any:
    """Parse a recipe file: UTF-8, at most MAX_RECIPE_BYTES, JSON or safe YAML without
    duplicate keys, alias bombs or deep nesting; each problem is one RecipeError line."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe: file {str(p)!r} does not exist")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe: {str(p)!r} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe: {str(p)!r} is not UTF-8 text (byte {exc.start})") from None
    is_json = p.suffix == ".json"
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates) if is_json else yaml.load(text, Loader=_RecipeLoader)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first = " ".join(str(exc).split())[:160]
        raise RecipeError(f"recipe: {str(p)!r} is not valid {'JSON' if is_json else 'YAML'} ({first})") from None
    except RecursionError:
        raise RecipeError(f"recipe: nested more than {MAX_DEPTH} levels deep") from None
    _depth(data)
    return data


def _build_stage(raw: Any, path: str, index: int) -> Stage:
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: must be a mapping like {{prune: {{sparsity: 0.9}}}}, got {type(raw).__name__}")
    names = stage_names()
    techniques = [k for k in raw if k not in ("finetune", "name")]
    if len(techniques) != 1:
        raise RecipeError(f"{path}: needs exactly one technique key (one of {', '.join(sorted(names))}), got {techniques or 'none'}")
    tech = techniques[0]
    if tech not in names:
        raise RecipeError(f"{path}.{tech}: unknown technique; use one of {', '.join(sorted(names))}")
    config = build_dataclass(names[tech], raw[tech] if raw[tech] is not None else {}, f"{path}.{tech}")
    finetune = build_dataclass(TrainConfig, raw["finetune"], f"{path}.finetune") if raw.get("finetune") is not None else None
    name = raw.get("name", tech)
    if not isinstance(name, str):
        raise RecipeError(f"{path}.name: must be a string, got {type(name).__name__}")
    return Stage(name, tech, config, finetune)


def _dedupe_names(stages: list[Stage]) -> None:
    """Stage names label rows and artifacts: make repeated ones unique (prune, prune-2, ...)."""
    seen: dict[str, int] = {"baseline": 1}
    for stage in stages:
        n = seen.get(stage.name, 0)
        seen[stage.name] = n + 1
        if n:
            stage.name = f"{stage.name}-{n + 1}"


def build_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build config ``cls`` from a recipe mapping, validated THROUGH the config contract
    (``config_base.from_dict``: pydantic, extra="forbid", declared bounds, renamed keys);
    the contract's one-line error is re-based onto the path inside the recipe."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
    try:
        return from_dict(cls, data, path)
    except ConfigError as exc:
        raise RecipeError(_rebase(str(exc), cls.__name__, path)) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RecipeError(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _rebase(message: str, cls_name: str, path: str) -> str:
    """'PruneConfig.sparsity: ...' -> 'stages[0].prune.sparsity: ...' (else prefix the path)."""
    if message.startswith(path):
        return message
    for prefix in (f"{cls_name}.", "TrainConfig."):
        if message.startswith(prefix):
            return f"{path}.{message[len(prefix):]}"
    return f"{path}: {message}"


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise RecipeError(f"{path}: {msg}")


def pydantic_message(exc: ValidationError) -> str:
    """One line naming the first invalid field of a pydantic validation error."""
    return _pydantic_message(exc)


def _pydantic_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [p for p in err["loc"] if p not in ("str", "TaskSpec", "ModelSpec") and "function" not in str(p)]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "recipe"
    msg = err["msg"].lower()
    if err["type"] == "extra_forbidden":
        msg = f"unknown key; allowed here: {', '.join(_allowed(loc))}"
    got = err.get("input")
    tail = f", got {got!r}"[:120] if err["type"] not in ("extra_forbidden", "missing") else ""
    return f"{path}: {msg}{tail}"


def _allowed(loc: list) -> list[str]:
    models = {"task": TaskSpec, "model": ModelSpec, "measure": MeasureSpec}
    model = models.get(loc[0], RecipeSpec) if len(loc) > 1 else RecipeSpec
    return list(model.model_fields)

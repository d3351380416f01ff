"""The ``search:`` block of a search recipe (``SearchSpec``), its budget syntax, and reading a
search recipe before any work, and the baseline both spaces start from (``torchslim search``;
``app/search.py`` and ``app/search_transformer.py`` run it).

Two spaces: ``space: cnn`` (the default: channel groups of the dependency graph, unstructured
sparsity, low-rank ratio and share bits per layer, int8 or float per layer; ``search.space``) and
``space: transformer`` (per BERT-style encoder layer heads and FFN units kept or the layer dropped,
int8 / float / 8-bit blocks per Linear group; ``search.transformer_space``, run by
``app/search_transformer.py``). A field of the other space is refused in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import field
from pathlib import Path
from typing import Any

from ..core.bounds import bounded, count, fraction
from ..core.config_base import config, to_dict
from ..core.errors import ConfigError, check
from ..core.train import TrainConfig
from ..search import rules
from .recipe import RecipeError, build_dataclass, load_recipe, read_recipe_file

METHODS = ("uniform", "sensitivity", "rules", "random", "tpe", "nsga2", "rl")
MANY = ("random", "tpe", "nsga2", "rl")  # the makers that evaluate `trials` policies (the rules: one)
INT8_BACKENDS = ("onnxruntime", "simulate")
SPACES = ("cnn", "transformer")
TRANSFORMER_METHODS = ("tpe", "random")  # Optuna over the plans; the rules and the agent walk channel groups
#: fields of one space only (one set off its default under the other space is refused)
CNN_ONLY = ("keep_min", "step", "sparsities", "int8", "rules", "ranks", "share_bits", "int8_backend",
            "sensitivity_sparsity")
TRANSFORMER_ONLY = ("heads_keep", "ffn_keep", "ffn_multiple", "layer_drop", "timing_batches")


@config
class TableSpec:
    """The latency table (``search.table``): widths timed per layer side and repeats per timing."""

    grid: int = count(9, 2, 64)
    repeats: int = count(7, 1, 1000)


@config
class SearchSpec:
    """The ``search:`` block of a search recipe (module doc), on the one config contract (unknown
    keys refused, every number bounded on both sides, a YAML/JSON round trip through
    ``config_base.to_dict`` / ``from_dict``).

    budget: exactly one of {latency: 0.5x}, {macs: 0.3x}, {size: 8MB | 0.2x}.
    method: uniform | sensitivity | rules | random | tpe | nsga2 | rl; trials: policies evaluated
        (by rl and the Optuna methods; the rule makers evaluate one).
    finetune: the per-policy recovery (a TrainConfig; None = none).
    accuracy_min: exit code 1 when the best val metric is below it (None = any).
    space: cnn (default) or transformer (module doc; a field of the other space is refused).
    keep_min / step / sparsities / ranks / share_bits / int8 / int8_backend: the CNN space
        (search.space.build_space): ranks = the parameter shares a factorized layer may keep,
        share_bits = the weight-sharing index widths a layer may take.
    heads_keep / ffn_keep / ffn_multiple / layer_drop: the transformer space
        (search.transformer_space.build_transformer_space); timing_batches: val batches each plan
        is timed on, end to end against the fp32 model (``table.repeats`` repeats).
    rules: the user rules of method rules (``search.rules.user_rules``: weight / keep per group,
        bits: 8 | 32 per layer with int8). storage / study / workers: the Optuna study (and
        worker processes). seed: the maker's seed. sensitivity_sparsity: method sensitivity's probe.
    table: the latency table; checks / tolerance: end-to-end timings of the best trials under a
        latency budget, and how far over the budget a measured ratio may lie (a share).
    progress: the bar over trials (``torchslim.core.progress``): None = auto, True, False.
    """

    budget: dict[str, Any] = field(default_factory=lambda: {"latency": "0.5x"})  # checked by parse_budget
    space: str = "cnn"
    method: str = "tpe"
    trials: int = count(20, 1, 100_000)
    finetune: TrainConfig | None = field(default_factory=lambda: TrainConfig(epochs=1))
    accuracy_min: float | None = fraction(None, optional=True)
    keep_min: float = fraction(0.25, low_open=True)
    step: int | None = count(8, 1, 1024, optional=True)
    sparsities: list[float] = field(default_factory=list)
    int8: bool = False
    rules: list[dict[str, Any]] = field(default_factory=list)
    storage: str | None = None
    study: str | None = None
    workers: int = count(1, 1, 64)
    seed: int = count(0, 0, 2**31 - 1)  # numpy / Optuna / stable-baselines3 seeds are 32-bit
    sensitivity_sparsity: float = fraction(0.8, low_open=True, high_open=True)
    table: TableSpec = field(default_factory=TableSpec)
    checks: int = count(5, 1, 100)           # latency budget: most candidates timed end to end
    tolerance: float = bounded(0.02, 0.0, 0.5)  # measured ratio may exceed the budget by this share
    int8_backend: str = "onnxruntime"        # int8: real ORT kernels, priced; or "simulate"
    progress: bool | None = None
    ranks: list[float] = field(default_factory=list)
    share_bits: list[int] = field(default_factory=list)
    heads_keep: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    ffn_keep: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.5])
    ffn_multiple: int = count(64, 1, 4096)
    layer_drop: bool = False
    timing_batches: int = count(4, 1, 10_000)

    def __post_init__(self) -> None:
        check(self.space in SPACES, "SearchSpec.space", f"unknown space {self.space!r}; use cnn or transformer")
        other = CNN_ONLY if self.space == "transformer" else TRANSFORMER_ONLY
        for name in other:
            check(getattr(self, name) == _default(name), f"SearchSpec.{name}",
                  f"is not part of the {self.space} space; remove it (or set space: "
                  f"{'cnn' if self.space == 'transformer' else 'transformer'})")
        if self.space == "transformer":
            check(self.method in TRANSFORMER_METHODS, "SearchSpec.method",
                  f"the transformer space is searched by {' or '.join(TRANSFORMER_METHODS)}, got {self.method!r}")
            check(self.workers == 1, "SearchSpec.workers", "the transformer space runs in one process; set workers: 1")
        for name, keeps in (("heads_keep", self.heads_keep), ("ffn_keep", self.ffn_keep)):
            check(0 < len(keeps) <= 16 and all(isinstance(k, (int, float)) and 0 < k <= 1 for k in keeps),
                  f"SearchSpec.{name}", f"give 1 to 16 kept shares in (0, 1], got {keeps!r}")
        check(len(self.ranks) <= 16 and all(isinstance(r, (int, float)) and 0 < r < 1 for r in self.ranks),
              "SearchSpec.ranks", f"give at most 16 kept parameter shares in (0, 1), got {self.ranks!r}")
        check(len(self.share_bits) <= 8 and all(isinstance(b, int) and 1 <= b <= 8 for b in self.share_bits),
              "SearchSpec.share_bits", f"give at most 8 index widths, integers in [1, 8], got {self.share_bits!r}")
        check(self.method in METHODS, "SearchSpec.method", f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        parse_budget(self.budget, where="SearchSpec")
        for s in self.sparsities:
            check(0.0 <= s < 1.0, "SearchSpec.sparsities", f"each must be a share removed in [0, 1), got {s!r}")
        check(self.int8_backend in INT8_BACKENDS, "SearchSpec.int8_backend",
              f"unknown backend {self.int8_backend!r}; use {' or '.join(INT8_BACKENDS)}")
        rules.check_rules(self.rules, self.int8, "SearchSpec.")  # the user rules (bits: 8 | 32 with int8)


def _default(name: str) -> Any:
    """SearchSpec's default of field ``name`` (its default_factory called for a list)."""
    f = SearchSpec.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def base_recipe(recipe: dict[str, Any], weights: Path) -> dict[str, Any]:
    """The recipe every written policy or plan starts from: the search recipe without ``train``
    (the baseline is trained once) or ``out``, its model loading the baseline's ``weights``."""
    base = copy.deepcopy(recipe)
    base.pop("train", None)
    base.pop("out", None)
    model_spec = base["model"] if isinstance(base["model"], dict) else {"name": base["model"]}
    base["model"] = dict(model_spec, weights=str(weights.resolve()))
    return base


def parse_budget(budget: dict[str, Any], base_nonzero_bytes: int | None = None, where: str = "search") -> rules.Budget:
    """{latency: 0.5x} / {macs: 0.3x} / {size: 8MB | 0.2x} -> Budget (size in non-zero fp32 bytes);
    errors name ``where``.budget (SearchSpec from Python, search in a recipe)."""
    if not isinstance(budget, dict) or len(budget) != 1:
        raise ConfigError(f"{where}.budget: give exactly one of latency, macs, size, e.g. {{latency: 0.5x}}")
    (kind, raw), = budget.items()
    if kind not in ("latency", "macs", "size"):
        raise ConfigError(f"{where}.budget.{kind}: unknown budget; use latency, macs or size")
    text = str(raw).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(x|kb|mb|gb|b)?", text)
    if not m:
        raise ConfigError(f"{where}.budget.{kind}: write a share like 0.5x (or for size 8MB), got {raw!r}")
    value, unit = float(m.group(1)), m.group(2) or "x"
    if unit != "x":
        if kind != "size":
            raise ConfigError(f"{where}.budget.{kind}: must be a share of the baseline like 0.5x, got {raw!r}")
        if base_nonzero_bytes is None:
            return rules.Budget("nonzeros", 1.0)  # resolved once the baseline is known
        value = value * {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}[unit] / base_nonzero_bytes
        value = min(value, 1.0)
    if not 0 < value <= 1:
        raise ConfigError(f"{where}.budget.{kind}: must be in (0, 1] of the baseline, got {raw!r}")
    return rules.Budget({"size": "nonzeros"}.get(kind, kind), value)


def read_search_recipe(path: str | Path) -> tuple[dict[str, Any], SearchSpec]:
    """(the recipe without its search block, validated; the search block), before any work."""
    data = read_recipe_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("search"), dict):
        raise RecipeError("search: a search recipe needs a `search:` mapping (budget, method, trials)")
    spec = build_dataclass(SearchSpec, data.pop("search"), "search")  # the contract; errors name search.<field>
    data.pop("stages", None)
    load_recipe(dict(data, stages=[]))  # task/model/train/measure checked now, not an hour in
    return data, spec


def baseline(recipe: dict[str, Any], out: Path, resume: bool, log) -> tuple[Any, Any, Path]:
    """(task, the trained baseline model in eval mode, its weights file ``out/baseline.safetensors``):
    trained by the recipe's ``train`` once, reused on resume; every policy or plan starts from it."""
    from ..core.train import fit
    from ..core.utils import seed_everything
    from ..export.weights import load_weights, save_weights
    from ..zoo import build_model, build_task

    parsed = load_recipe(dict(recipe, stages=[]))
    task = build_task(parsed.task.name, **parsed.task.kwargs)
    seed_everything(parsed.spec.seed)
    model = build_model(parsed.model.name, task, **parsed.model.kwargs)
    path = out / "baseline.safetensors"
    if resume and path.exists():
        load_weights(model, path)
        log(f"baseline: reusing {path}")
    else:
        if parsed.model.weights:
            load_weights(model, parsed.model.weights)
        if parsed.train is not None:
            log(f"baseline: training {parsed.model.name} on {task.name}")
            fit(model, task, parsed.train)
        save_weights(model, path)
    return task, model.eval(), path


def finetune_fields(finetune: TrainConfig | None) -> dict[str, Any] | None:
    """The per-policy fine-tune as the written recipe's ``train`` mapping: only the fields that
    differ from TrainConfig's defaults, so best_recipe.yaml stays as short as the user wrote it."""
    if finetune is None:
        return None
    data, default = to_dict(finetune), to_dict(TrainConfig())
    return {k: v for k, v in data.items() if v != default[k]}

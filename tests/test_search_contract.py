"""The search recipe's ``search:`` block (``SearchSpec``, with ``table`` and ``finetune`` nested)
is on the one config contract (issue 11, item 1): declared with ``@config``, unknown keys refused
at every level, every number bounded on both sides, a YAML and a JSON round trip, and the same
one-line error from Python (``SearchSpec.<field>``) and from a recipe (``search.<field>``)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from test_config_bounds import _numeric_fields
from torchslim.app.recipe import RecipeError
from torchslim.app.search import SearchSpec, TableSpec, finetune_fields, read_search_recipe
from torchslim.core.config_base import from_dict, is_config, to_dict
from torchslim.core.errors import ConfigError
from torchslim.core.train import TrainConfig

CASES = [(cls, name) for cls in (SearchSpec, TableSpec) for name in _numeric_fields(cls)]


def _recipe(tmp_path, **search):
    src = {"task": {"name": "mnist1d", "kwargs": {"num_samples": 1200}}, "model": "rescnn1d", "seed": 0,
           "search": {"budget": {"macs": "0.5x"}, **search}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(src))
    return path


def test_declared_with_the_contract_and_nested_configs_typed():
    assert is_config(SearchSpec) and is_config(TableSpec)
    spec = SearchSpec(finetune={"epochs": 2, "max_steps": 5}, table={"grid": 3})
    assert isinstance(spec.finetune, TrainConfig) and spec.finetune.max_steps == 5
    assert isinstance(spec.table, TableSpec) and spec.table.grid == 3 and spec.table.repeats == 7
    assert {"trials", "workers", "seed", "checks", "tolerance", "keep_min", "grid", "repeats"} <= {n for _, n in CASES}


def test_round_trip_yaml_and_json():
    spec = SearchSpec(budget={"size": "8MB"}, method="nsga2", trials=7, finetune=TrainConfig(epochs=1, lr=0.01),
                      accuracy_min=0.9, sparsities=[0.0, 0.5], int8=True, table=TableSpec(grid=4, repeats=3),
                      rules=[{"match": "layers.*", "keep": 0.5}], progress=False)
    data = to_dict(spec)
    assert set(data) == {f.name for f in dataclasses.fields(SearchSpec)}
    via_yaml = from_dict(SearchSpec, yaml.safe_load(yaml.safe_dump(data)))
    via_json = from_dict(SearchSpec, json.loads(json.dumps(data)))
    assert via_yaml == spec and via_json == spec and to_dict(via_yaml) == data
    assert from_dict(SearchSpec, to_dict(SearchSpec())) == SearchSpec()


@pytest.mark.parametrize("cls,name", CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_numeric_field_bounded_on_both_sides(cls, name):
    for bad in (10**30, -(10**12), math.nan, math.inf, True, "3"):
        with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{name}: "):
            cls(**{name: bad})


def test_list_and_budget_numbers_are_checked_too():
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ConfigError, match=r"^SearchSpec\.sparsities(\[1\])?: "):
            SearchSpec(sparsities=[0.5, bad])
    for bad in (0.0, 1.5, math.nan, math.inf, True, "fast"):
        with pytest.raises(ConfigError, match=r"^SearchSpec\.budget\.latency: "):
            SearchSpec(budget={"latency": bad})
    with pytest.raises(ConfigError, match=r"^SearchSpec\.budget: give exactly one of latency, macs, size"):
        SearchSpec(budget={"latency": "0.5x", "macs": "0.5x"})


def test_unknown_keys_refused_at_every_level(tmp_path):
    with pytest.raises(ConfigError, match=r"^SearchSpec\.budgett: unknown field of SearchSpec — use one of: budget,"):
        SearchSpec(budgett={"latency": "0.5x"})
    with pytest.raises(RecipeError, match=r"^search\.table\.grd: unknown field of TableSpec — use one of: grid, repeats$"):
        read_search_recipe(_recipe(tmp_path, table={"grd": 3}))
    with pytest.raises(RecipeError, match=r"^search\.finetune\.epoch: unknown field of TrainConfig"):
        read_search_recipe(_recipe(tmp_path, finetune={"epoch": 1}))


@pytest.mark.parametrize("fields", [{"trials": 0}, {"table": {"repeats": 10**6}}, {"finetune": {"epochs": -1}},
                                    {"budget": {"latency": "2x"}}, {"method": "genetic"}, {"workers": 65},
                                    {"int8_backend": "tensorrt"}, {"tolerance": 0.9}])
def test_python_and_recipe_give_the_same_error_naming_the_path(tmp_path, fields):
    with pytest.raises(ConfigError) as py:
        SearchSpec(**{"budget": {"macs": "0.5x"}, **fields})
    with pytest.raises(RecipeError) as rc:
        read_search_recipe(_recipe(tmp_path, **fields))
    py_msg, rc_msg = str(py.value), str(rc.value)
    assert py_msg.startswith("SearchSpec.") and "\n" not in rc_msg
    assert rc_msg == "search." + py_msg.removeprefix("SearchSpec."), (py_msg, rc_msg)
    assert rc_msg.startswith(f"search.{next(iter(fields))}")


def test_every_bundled_search_recipe_still_reads(tmp_path):
    from pathlib import Path

    found = [p for p in sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")) if "\nsearch:" in p.read_text()]
    assert len(found) >= 3
    for path in found:
        _, spec = read_search_recipe(path)
        assert isinstance(spec, SearchSpec)
        # a CNN search fine-tunes each policy; the transformer recipe scores plans unfine-tuned
        assert isinstance(spec.finetune, TrainConfig) if spec.space == "cnn" else spec.finetune is None


def test_the_written_fine_tune_is_what_the_user_wrote():
    assert finetune_fields(None) is None
    assert finetune_fields(TrainConfig(epochs=1, max_steps=4)) == {"epochs": 1, "max_steps": 4}
    assert finetune_fields(TrainConfig()) == {}  # the defaults: a train stage with no fields
    assert TrainConfig(**finetune_fields(TrainConfig(epochs=3, lr=0.01, scheduler="StepLR"))) == \
        TrainConfig(epochs=3, lr=0.01, scheduler="StepLR")

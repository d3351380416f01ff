"""The one config contract (issue 11, item 1): every technique config is a pydantic dataclass
declared with ``config_base.config``; unknown keys are refused, numbers are strict and finite,
a config round-trips through YAML and JSON, and a recipe validates through the same contract
(the same one-line error from Python and from a recipe)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from test_config_bounds import BASE, CONFIGS
from torchslim.app.recipe import RecipeError, build_dataclass, load_recipe
from torchslim.core.config_base import SCHEMA_VERSION, check_schema, from_dict, is_config, to_dict
from torchslim.core.errors import ConfigError
from torchslim.core.stage import STAGES, stage_names
from torchslim.core.train import TrainConfig

CONTRACT = CONFIGS


def _base(cls):
    return cls(**BASE.get(cls.__name__, {}))


def test_every_registered_stage_config_is_on_the_contract():
    missing = sorted(t.__name__ for t in STAGES if not is_config(t))
    assert missing == []
    assert len(STAGES) >= 12


def test_every_config_is_on_the_contract():
    """Not only the registered stages: the configs they and the exports take (OnnxExportConfig,
    MeasureConfig, TrainConfig, the backends' configs) are declared with @config too."""
    assert [c.__name__ for c in CONTRACT if not is_config(c)] == []
    assert {"OnnxExportConfig", "MeasureConfig", "RecoveryConfig", "OrtQuantConfig", "TorchaoConfig",
            "TrainConfig"} <= {c.__name__ for c in CONTRACT}


def test_onnx_export_config_on_the_contract():
    from torchslim.export.onnx import OnnxExportConfig

    cfg = from_dict(OnnxExportConfig, yaml.safe_load("{opset: 13, exporter: auto, atol: 0.01, dynamic_seq: false}"))
    assert to_dict(cfg) == {"opset": 13, "dynamic_batch": True, "dynamic_seq": False, "exporter": "auto",
                            "verify": True, "atol": 0.01, "rtol": 0.001}
    assert from_dict(OnnxExportConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    cases = [({"opset": 22}, "OnnxExportConfig.opset: must be an integer in [11, 21], got 22"),
             ({"opset": 10}, "OnnxExportConfig.opset: must be an integer in [11, 21], got 10"),
             ({"opset": 17.0}, "OnnxExportConfig.opset: must be an integer in [11, 21], got 17.0"),
             ({"atol": -1e-9}, "OnnxExportConfig.atol: must be a finite number in [0, 1e+06], got -1e-09"),
             ({"rtol": float("inf")}, "OnnxExportConfig.rtol: must be a finite number in [0, 1e+06], got inf"),
             ({"verify": 1}, "OnnxExportConfig.verify: input should be a valid boolean, got 1"),
             ({"exporter": "tf"}, "OnnxExportConfig.exporter: must be one of torchscript, dynamo, auto, got 'tf'")]
    for fields, expected in cases:
        with pytest.raises(ConfigError) as err:
            OnnxExportConfig(**fields)
        assert str(err.value) == expected
    with pytest.raises(ConfigError, match=r"^OnnxExportConfig\.dynamic: unknown field of OnnxExportConfig — use one of: opset, "):
        from_dict(OnnxExportConfig, {"dynamic": True})


@pytest.mark.parametrize("cls", CONTRACT, ids=[c.__name__ for c in CONTRACT])
def test_round_trip_yaml_and_json(cls):
    cfg = _base(cls)
    data = to_dict(cfg)
    assert set(data) == {f.name for f in dataclasses.fields(cls)}
    via_yaml = from_dict(cls, yaml.safe_load(yaml.safe_dump(data)))
    via_json = from_dict(cls, json.loads(json.dumps(data)))
    assert via_yaml == cfg and via_json == cfg
    assert to_dict(via_yaml) == data


@pytest.mark.parametrize("cls", CONTRACT, ids=[c.__name__ for c in CONTRACT])
def test_unknown_key_refused_in_one_line(cls):
    with pytest.raises(ConfigError) as err:
        cls(**BASE.get(cls.__name__, {}), zz_not_a_field=1)
    msg = str(err.value)
    assert msg.startswith(f"{cls.__name__}.zz_not_a_field: unknown field of {cls.__name__}") and "\n" not in msg
    assert dataclasses.fields(cls)[0].name in msg  # names the fields it does take


def test_nested_round_trip_keeps_types():
    from torchslim.pruning import PruneConfig

    cfg = PruneConfig(sparsity=0.8, finetune=TrainConfig(epochs=3, lr=0.01))
    back = from_dict(PruneConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert back == cfg and isinstance(back.finetune, TrainConfig) and back.finetune.epochs == 3
    assert dataclasses.replace(back, sparsity=0.5).finetune == cfg.finetune


def test_numbers_are_strict_and_finite():
    for bad in (True, "3", 3.0, float("nan")):
        with pytest.raises(ConfigError, match=r"^TrainConfig\.epochs: must be an integer in \[0, 100000\]"):
            TrainConfig(epochs=bad)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)  # an int is a number
    with pytest.raises(ConfigError, match=r"^TrainConfig\.amp: input should be a valid boolean"):
        TrainConfig(amp=1)
    with pytest.raises(ConfigError, match=r"^TrainConfig\.lr: must be a finite number in \(0, 10\], got inf$"):
        dataclasses.replace(TrainConfig(), lr=float("inf"))  # replace validates too


def test_nested_errors_name_the_full_path():
    from torchslim.pruning import PruneConfig

    with pytest.raises(ConfigError) as err:
        PruneConfig(finetune={"epochs": -1})
    assert str(err.value) == "PruneConfig.finetune.epochs: must be an integer in [0, 100000], got -1"
    with pytest.raises(ConfigError) as err:
        PruneConfig(finetune={"resume": True})
    assert str(err.value) == "PruneConfig.finetune.resume: needs checkpoint_dir to resume from"


def test_recipe_and_python_give_the_same_error():
    names = stage_names()
    for key, fields in (("prune", {"sparsity": 1.5}), ("quantize", {"bits": 9}), ("share", {"seed": -1}),
                        ("train", {"epochs": "many"})):
        with pytest.raises(ConfigError) as py:
            names[key](**fields)
        with pytest.raises(RecipeError) as rc:
            build_dataclass(names[key], fields, f"stages[0].{key}")
        assert str(rc.value) == f"stages[0].{key}." + str(py.value).split(".", 1)[1]


def test_schema_version():
    recipe = {"task": "digits", "model": "lenet300", "stages": []}
    assert load_recipe(recipe).stages == [] and load_recipe({**recipe, "schema": SCHEMA_VERSION}).stages == []
    check_schema({})
    with pytest.raises(RecipeError, match=r"^schema: version 2 is newer than this torchslim reads \(1\)"):
        load_recipe({**recipe, "schema": 2})
    with pytest.raises(ConfigError, match=r"^recipe\.schema: must be a positive integer"):
        check_schema({"schema": True})


def test_python_objects_have_no_data_form():
    from torch import nn

    from torchslim.distillation import DistillConfig

    with pytest.raises(ConfigError, match=r"^DistillConfig: holds a Python object"):
        to_dict(DistillConfig(teacher=nn.Linear(2, 2)))


# every old key of issue 11's renames -> the one line that names the new key
RENAMED = [
    ("prune", "layer_types", ["Linear"], "layers: {types: [...]}"),
    ("prune", "include", ["net.*"], "layers: {include: [...]}"),
    ("prune", "exclude", ["net.*"], "layers: {exclude: [...]}"),
    ("prune", "taylor_batches", 2, "batches"),
    ("nm", "include", ["net.*"], "layers: {include: [...]}"),
    ("nm", "taylor_batches", 2, "batches"),
    ("structured_prune", "ignore", ["net.1"], "layers: {exclude: [...]}"),
    ("structured_prune", "taylor_batches", 2, "batches"),
    ("distill", "train", {"epochs": 1}, "finetune"),
    ("lowrank", "ratio", 0.5, "params_keep"),
    ("layer_drop", "candidates", ["layers.0"], "layers: [...] (the blocks to consider)"),
    ("quantize", "skip", ["fc"], "layers: {exclude: [...]}"),
    ("quantize", "calibration_batches", 4, "batches"),
    ("quantize", "qat_epochs", 2, "finetune: {epochs: N}"),
    ("quantize", "qat_steps", 5, "finetune: {max_steps: N}"),
    ("quantize", "qat_lr", 1e-4, "finetune: {lr: X}"),
    ("early_exit", "include", ["layers.*"], "layers: {include: [...]}"),
]


@pytest.mark.parametrize("stage,old,value,new", RENAMED, ids=[f"{r[0]}.{r[1]}" for r in RENAMED])
def test_old_keys_refused_naming_the_new_one(stage, old, value, new):
    cls = stage_names()[stage]
    with pytest.raises(ConfigError) as py:
        cls(**{old: value})
    assert str(py.value) == f"{cls.__name__}.{old}: renamed — write {new}"
    recipe = {"task": "digits", "model": "lenet300", "stages": [{stage: {old: value}}]}
    with pytest.raises(RecipeError) as rc:
        load_recipe(recipe)
    assert str(rc.value) == f"stages[0].{stage}.{old}: renamed — write {new}"


def test_one_layer_selection_everywhere():
    """Every technique config that selects layers does so with one LayerSelection named layers;
    a list in a recipe is its include patterns, a mapping its fields."""
    from torch import nn

    from torchslim.core.selection import LayerSelection, select_layers

    names = stage_names()
    selecting = ("prune", "nm", "structured_prune", "transformer_prune", "quantize", "share", "lowrank",
                 "early_exit", "layer_drop")
    # every stage config with a `layers` field is in the list above (a new one must join it)
    with_layers = {k for k, c in names.items() if "layers" in {f.name for f in dataclasses.fields(c)}}
    assert with_layers == set(selecting)
    for key in selecting:
        base = {"lowrank": {"params_keep": 0.5}, "layer_drop": {"count": 1}}.get(key, {})
        cfg = build_dataclass(names[key], {**base, "layers": ["net.*"]}, f"stages[0].{key}")
        assert cfg.layers == LayerSelection(include=("net.*",)), key
        if key == "early_exit":  # exits are placed after whole blocks, named: no types / filter_fn
            cfg = build_dataclass(names[key], {**base, "layers": {"exclude": ["net.3"]}}, "s")
            assert cfg.layers.exclude == ("net.3",)
            continue
        cfg = build_dataclass(names[key], {**base, "layers": {"exclude": ["net.3"], "types": ["Linear"]}}, "s")
        assert cfg.layers.exclude == ("net.3",) and cfg.layers.types == ("Linear",)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Conv1d(1, 2, 3), nn.Linear(8, 2)))
    picked = select_layers(model, LayerSelection(exclude=("2.0",)), ("Linear", "Conv1d"))
    assert [n for n, _ in picked] == ["0", "2.1"]
    picked = select_layers(model, LayerSelection(include=("2.*",), types=(nn.Conv1d,)))
    assert [n for n, _ in picked] == ["2.0"]
    wide = LayerSelection(filter_fn=lambda m, n: getattr(m, "out_features", 0) > 4)
    assert [n for n, _ in select_layers(model, wide, ("Linear",))] == ["0"]


def test_error_paths_read_as_written():
    """pydantic's union-member tags ("bits.int") are not part of the path the user wrote."""
    from torchslim.sharing import ShareConfig

    cases = [(lambda: ShareConfig(bits=2.5), "ShareConfig.bits: input should be a valid integer, got 2.5"),
             (lambda: ShareConfig(layers=["a", 1]), "ShareConfig.layers.include[1]: input should be a valid string, got 1"),
             (lambda: ShareConfig(layers={"typs": ["Linear"]}), "ShareConfig.layers.typs: unknown field of LayerSelection"),
             (lambda: TrainConfig(optimizer_kwargs=[1]), "TrainConfig.optimizer_kwargs: input should be a valid dictionary")]
    for make, expected in cases:
        with pytest.raises(ConfigError) as err:
            make()
        assert str(err.value).startswith(expected), str(err.value)


def test_recipe_keys_declared_next_to_the_config():
    """The recipe key of a stage is derived from its class name, or declared on the config
    (``@config(stage="quantize")``): no separate name table to keep in step."""
    assert sorted(stage_names()) == ["cascade", "distill", "early_exit", "layer_drop", "lowrank", "nm", "online",
                                     "prune", "quantize", "share", "structured_prune", "train", "transformer_prune"]

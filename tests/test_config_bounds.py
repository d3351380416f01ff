"""Every numeric field of every technique config has bounds on both sides (issue 12, point 4):
a value far above or below its range, NaN, inf or a bool is refused with a ConfigError naming
the config, before any work. The configs are found through the stage registry, so a new
technique is checked without touching this file."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from torchslim.core.bounds import range_of
from torchslim.core.errors import ConfigError
from torchslim.core.stage import STAGES, load_techniques

load_techniques()

# the smallest valid construction of configs that need one field set
BASE = {
    "StructuredPruneConfig": {},
    "LowRankConfig": {"params_keep": 0.5},
    "LayerDropConfig": {"count": 1},
    "RecoveryConfig": {"method": "random"},
    "CascadeConfig": {"small": "torchslim.zoo:build_model"},
}
# numeric fields validated by hand (the rule for them is richer than one range)
BY_HAND = {
    ("LowRankConfig", "rank"): "an int or {layer: rank}, each <= min(in, out) of the layer",
    ("ShareConfig", "bits"): "an int or {pattern: bits}, each in [1, 8]",
}


def _sub_configs() -> list[type]:
    from torchslim.app.search import SearchSpec, TableSpec
    from torchslim.core.measure import MeasureConfig
    from torchslim.core.train import TrainConfig
    from torchslim.export.onnx import OnnxExportConfig
    from torchslim.pruning.regrow import RecoveryConfig
    from torchslim.quantization.ort_backend import OrtQuantConfig
    from torchslim.quantization.torchao_backend import TorchaoConfig

    return [OnnxExportConfig, MeasureConfig, RecoveryConfig, OrtQuantConfig, TorchaoConfig, TrainConfig, SearchSpec,
            TableSpec]


CONFIGS = sorted({*STAGES, *_sub_configs()}, key=lambda t: t.__name__)


def _numeric_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        if any(a in (int, float) for a in args) and not any(typing.get_origin(a) is dict for a in args):
            out.append(f.name)
    return out


CASES = [(cls, name) for cls in CONFIGS for name in _numeric_fields(cls) if (cls.__name__, name) not in BY_HAND]


def test_every_registered_technique_is_covered():
    names = {c.__name__ for c in CONFIGS}
    assert {"PruneConfig", "QuantConfig", "ShareConfig", "StructuredPruneConfig", "TrainConfig"} <= names
    assert len(CASES) > 60


@pytest.mark.parametrize("cls,name", CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_numeric_field_bounded_on_both_sides(cls, name):
    base = BASE.get(cls.__name__, {})
    cls(**base)  # the base construction is valid
    for bad in (10**30, -(10**12), math.nan, math.inf, True, "3"):
        with pytest.raises(ConfigError, match=cls.__name__):
            cls(**{**base, name: bad})


def test_declared_range_message_names_field_and_range():
    from torchslim.quantization import QuantConfig

    assert range_of(QuantConfig, "batches") is not None
    with pytest.raises(ConfigError) as err:
        QuantConfig(batches=10**9)
    assert str(err.value) == "QuantConfig.batches: must be an integer in [1, 100000], got 1000000000"

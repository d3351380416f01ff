"""torchslim: make trained PyTorch models really smaller and faster, and measure it.

This module only re-exports; each technique lives in its own module (see docs/architecture.md).
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import (  # callable packages: torchslim.prune(model, cfg, task), torchslim.quantize(...)
    prune,
    quantize,
)
from .distill import DistillConfig
from .distill import apply as distill
from .errors import ConfigError, TaskError, TorchslimError, WeightsError
from .export.rebuild import load
from .lowrank import LowRankConfig
from .lowrank import apply as factorize
from .measure import MeasureConfig, Record, count_macs, format_records, measure
from .prune import NMConfig, PruneConfig, StructuredPruneConfig, TransformerPruneConfig
from .quantize import QuantConfig
from .share import ShareConfig
from .share import apply as cluster
from .stage import StageResult, apply_stage
from .task import Task
from .train import FitResult, TrainConfig, fit

__all__ = [
    "ConfigError",
    "DistillConfig",
    "FitResult",
    "LowRankConfig",
    "MeasureConfig",
    "NMConfig",
    "PruneConfig",
    "QuantConfig",
    "Record",
    "ShareConfig",
    "StageResult",
    "StructuredPruneConfig",
    "Task",
    "TaskError",
    "TorchslimError",
    "TrainConfig",
    "TransformerPruneConfig",
    "WeightsError",
    "apply_stage",
    "cluster",
    "count_macs",
    "distill",
    "factorize",
    "fit",
    "format_records",
    "load",
    "measure",
    "prune",
    "quantize",
    "run_recipe",
]


def run_recipe(recipe, out=None, resume=False, log=print):
    """Run a recipe (path, dict or Recipe); see torchslim.runner.run_recipe."""
    from .runner import run_recipe as _run

    return _run(recipe, out=out, resume=resume, log=log)

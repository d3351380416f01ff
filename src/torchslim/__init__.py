"""torchslim: make trained PyTorch models really smaller and faster, and measure it.

This module only re-exports; each technique lives in its own module (see docs/architecture.md).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, TaskError, TorchslimError, WeightsError
from .measure import MeasureConfig, Record, count_macs, format_records, measure
from .stage import StageResult, apply_stage
from .task import Task
from .train import FitResult, TrainConfig, fit

from . import prune, quantize  # callable packages: torchslim.prune(model, cfg, task), torchslim.quantize(...)
from .prune import NMConfig, PruneConfig, StructuredPruneConfig, TransformerPruneConfig
from .quantize import QuantConfig
from .share import ShareConfig
from .share import apply as cluster

__all__ = [
    "ConfigError", "FitResult", "MeasureConfig", "Record", "StageResult", "Task", "TaskError",
    "TorchslimError", "TrainConfig", "WeightsError", "apply_stage", "count_macs", "fit",
    "format_records", "measure", "run_recipe", "prune", "quantize", "PruneConfig", "NMConfig",
    "StructuredPruneConfig", "TransformerPruneConfig", "QuantConfig", "ShareConfig", "cluster",
]


def run_recipe(recipe, out=None, resume=False, log=print):
    """Run a recipe (path, dict or Recipe); see torchslim.runner.run_recipe."""
    from .runner import run_recipe as _run

    return _run(recipe, out=out, resume=resume, log=log)

"""torchslim: make trained PyTorch models really smaller and faster, and measure it.

This module only re-exports; each technique lives in its own module (see docs/architecture.md).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .core.errors import ConfigError, TaskError, TorchslimError, WeightsError
from .core.measure import MeasureConfig, Record, count_macs, format_records, measure
from .core.stage import StageResult, apply_stage
from .core.task import Task
from .core.train import FitResult, TrainConfig, fit
from .distillation import DistillConfig
from .export.rebuild import load
from .lowrank import LowRankConfig
from .pruning import NMConfig, PruneConfig, StructuredPruneConfig, TransformerPruneConfig, prune
from .quantization import QuantConfig, quantize
from .sharing import ShareConfig

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
    "cascade",
    "cluster",
    "count_macs",
    "distill",
    "early_exit",
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
    """Run a recipe (path, dict or Recipe); see torchslim.app.runner.run_recipe."""
    from .app.runner import run_recipe as _run

    return _run(recipe, out=out, resume=resume, log=log)


def _checked(config, cls: type, name: str) -> None:
    if not isinstance(config, cls):
        raise ConfigError(f"{name}: config must be a {cls.__name__}, got {type(config).__name__}")


def cluster(model, config: ShareConfig, task: Task) -> StageResult:
    """Weight sharing (k-means codebooks, optional fine-tune) on a copy of model."""
    _checked(config, ShareConfig, "cluster")
    return apply_stage(model, config, task)


def factorize(model, config: LowRankConfig, task: Task) -> StageResult:
    """Low-rank factorization (SVD pairs, optional fine-tune) on a copy of model."""
    _checked(config, LowRankConfig, "factorize")
    return apply_stage(model, config, task)


def distill(model, config: DistillConfig, task: Task, teacher=None) -> StageResult:
    """Knowledge distillation of a copy of model (the student) from ``teacher`` (default:
    config.teacher)."""
    import dataclasses

    _checked(config, DistillConfig, "distill")
    if teacher is not None:
        config = dataclasses.replace(config, teacher=teacher)
    return apply_stage(model, config, task)


def early_exit(model, config, task: Task) -> StageResult:
    """Exit heads after chosen blocks, trained and calibrated; the returned model really skips
    the blocks an easy input does not need (torchslim.dynamic, docs/early_exit.md)."""
    from .dynamic import ExitConfig

    _checked(config, ExitConfig, "early_exit")
    return apply_stage(model, config, task)


def cascade(model, config, task: Task) -> StageResult:
    """A small model answers first and hands low-confidence inputs to ``model`` (the large one)."""
    from .dynamic import CascadeConfig

    _checked(config, CascadeConfig, "cascade")
    return apply_stage(model, config, task)

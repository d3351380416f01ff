"""Pruning: unstructured (magnitude, Taylor, L1 path), N:M, schedules (one-shot, iterative,
gradual cubic), recovery (fine-tune, regrowth), sensitivity, and structured pruning with
physical removal (channels/neurons, transformer heads and FFN neurons, whole layers).

``prune(model, config, task)`` runs whichever pruning config it is given and returns a
``StageResult`` (``.model``, ``.info`` with the per-layer record).
"""

from ..core.stage import StageResult, apply_stage, register_training_hooks
from . import nm, unstructured
from .importance import (
    CRITERIA,
    accumulate_grads,
    backward_batches,
    bn_scale,
    group_norm,
    register_criterion,
    score_params,
)
from .layers import Bypass, LayerDropConfig, drop_layers, layer_importance
from .masks import MaskKeeper, apply_masks, attach_masks, masks_for_sparsity, masks_of, remove
from .nm import NMConfig, check_nm, nm_mask, prune_nm
from .regrow import RecoveryConfig, recover
from .schedule import GradualPruner, cubic_sparsity, gradual, iterative, oneshot
from .sensitivity import allocate, sensitivity
from .structured import StructuredPruneConfig, prune_structured
from .transformer import TransformerPruneConfig, prune_transformer
from .unstructured import PruneConfig, prune_model, select_layers, weight_sparsity


@register_training_hooks
def _keep_masks(model) -> list:
    """Any later training (fine-tune blocks, distillation, QAT) keeps pruned weights at zero."""
    return [MaskKeeper()] if masks_of(model) else []


PRUNE_CONFIGS = (PruneConfig, NMConfig, StructuredPruneConfig, TransformerPruneConfig, LayerDropConfig)


def prune(model, config, task) -> StageResult:
    """Prune model as config says (any of PRUNE_CONFIGS); returns StageResult(model, info)."""
    if not isinstance(config, PRUNE_CONFIGS):
        from ..core.errors import ConfigError

        raise ConfigError(f"prune: config must be one of {', '.join(c.__name__ for c in PRUNE_CONFIGS)}, "
                          f"got {type(config).__name__}")
    return apply_stage(model, config, task)


__all__ = [
    "CRITERIA",
    "Bypass",
    "GradualPruner",
    "LayerDropConfig",
    "MaskKeeper",
    "NMConfig",
    "PruneConfig",
    "RecoveryConfig",
    "StructuredPruneConfig",
    "TransformerPruneConfig",
    "accumulate_grads",
    "allocate",
    "apply_masks",
    "attach_masks",
    "backward_batches",
    "bn_scale",
    "check_nm",
    "cubic_sparsity",
    "drop_layers",
    "gradual",
    "group_norm",
    "iterative",
    "layer_importance",
    "masks_for_sparsity",
    "masks_of",
    "nm",
    "nm_mask",
    "oneshot",
    "prune",
    "prune_model",
    "prune_nm",
    "prune_structured",
    "prune_transformer",
    "recover",
    "register_criterion",
    "remove",
    "score_params",
    "select_layers",
    "sensitivity",
    "unstructured",
    "weight_sparsity",
]

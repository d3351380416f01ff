"""Quantization-aware training: fine-tune a fake-quantized model with the ordinary trainer.

The fake-quant layers carry the straight-through estimator, so ``torchslim.train.fit`` needs no
special hook: gradients reach the float weights through the rounding. Without learnable scales,
weight scales follow the weights (recomputed each step) and activation ranges stay at their
calibrated values; with ``learnable_scales`` both become parameters trained with LSQ's gradient.
"""

from __future__ import annotations

from torch import nn

from ..task import Task
from ..train import FitResult, TrainConfig, fit
from .calibrate import fq_layers
from .config import QuantConfig


def qat_train_config(cfg: QuantConfig) -> TrainConfig:
    epochs = cfg.qat_epochs if cfg.qat_epochs > 0 else 10**6  # qat_steps alone bounds the run
    return TrainConfig(epochs=epochs, max_steps=cfg.qat_steps, lr=cfg.qat_lr, optimizer="Adam", seed=cfg.seed)


def finetune(model: nn.Module, task: Task, cfg: QuantConfig, train_cfg: TrainConfig | None = None) -> FitResult:
    """Fine-tune the fake-quantized ``model`` in place; returns the trainer's record."""
    layers = fq_layers(model)
    if cfg.learnable_scales:
        for m in layers.values():
            m.wq.make_learnable()
            if m.aq is not None:
                m.aq.make_learnable()
    result = fit(model, task, train_cfg or qat_train_config(cfg))
    model.eval()
    for m in layers.values():  # scales that follow the weights: match the final weights
        if not m.wq.learnable:
            m.wq.calibrate(m.layer.weight)
    return result

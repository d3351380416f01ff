"""Quantization-aware training: fine-tune a fake-quantized model with the ordinary trainer.

The fake-quant layers carry the straight-through estimator, so ``torchslim.core.train.fit`` needs no
special hook: gradients reach the float weights through the rounding. Without learnable scales,
weight scales follow the weights (recomputed each step) and activation ranges stay at their
calibrated values; with ``learnable_scales`` both become parameters trained with LSQ's gradient
(Esser et al. 2020, "Learned Step Size Quantization"), set up as follows:

- init: the calibrated scales (weights: min/max per scale group; activations: the configured
  observer). LSQ's own init 2<|v|>/sqrt(Qp) is *coarser* than max|w|/Qp for the light-tailed,
  BatchNorm-folded weights here (0.76 <|w|> vs max|w|/7 at 4 bits: 1.1-2.5x larger step on
  every layer of the test CNN) and measured worse (8 seeds: 0.859 vs 0.906 test accuracy, both
  with the scale lr at ratio 1).
- gradient: d out / d s of LSQ, multiplied by g = 1/sqrt(N * Qp) (``fake.grad_scaled``;
  N = weights per scale, or features per sample for activations).
- no weight decay on scales (own optimizer groups, weight_decay=0 even with AdamW).
- scales stay positive: clamped to >= fake.EPS after every optimizer step (``ScaleKeeper``).
- learning rate: LSQ balances the step size's *relative* update against its weights' relative
  update (their ratio R ~ 1). g does that under SGD, but Adam divides every gradient by its
  own running RMS, so g cancels and each scale moved by ~lr per step *in absolute terms*: at
  lr 1e-3 that is 0.6-5 % of a 4-bit weight scale (0.03-0.16) or an 8-bit activation scale
  (0.02-0.06) per step, R = 2.7 (weight scales) and 4.5 (activation scales) measured. That was
  why LSQ lost to plain QAT: the per-tensor weight scales shrank 10-27 % within 34 steps
  (overshooting; clipped weights get no STE gradient back), and learning only the weight
  scales that way lost most (5 seeds: 0.845 vs 0.914). For Adam-like optimizers each layer's
  scales get their own group with lr_s = SCALE_LR_RATIO * lr * mean(s0) / rms(w): Adam then
  moves s by that fraction of itself per step relative to the layer's weights (R = 1.0
  measured at ratio 1), the Adam form of LSQ's balance. Under SGD (a ``train_cfg`` override)
  g does it and lr_s = lr, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.stage import register_training_hooks, training_hooks
from ..core.task import Task
from ..core.train import FitResult, TrainConfig, fit
from .calibrate import fq_layers
from .config import QuantConfig
from .fake import EPS

# Scale step / weight step, relative to each one's magnitude (LSQ's R), for Adam-like optimizers.
# 1/3 rather than 1: a step size's gradient is a sum over all the weights it serves, so its
# sign is steady and Adam's normalized steps add up coherently, while each weight's steps are
# partly noise. Measured R = 0.33 (weight scales) / 0.45 (activation scales) per step; on the
# test CNN LSQ - plain QAT was -0.1 pt (8 QAT seeds) and +0.0 pt (7 retrained fp32 models x 3
# seeds) against -1.0 / -1.0 pt at ratio 1 and -5.4 pt with the old absolute lr (5 seeds);
# on B3's ResCNN/MNIST-1D both ratios were within noise of plain QAT (3 seeds).
SCALE_LR_RATIO = 1 / 3
_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta")


def qat_train_config(cfg: QuantConfig) -> TrainConfig:
    """The QAT budget: ``cfg.finetune`` (a ConfigError when QAT was not asked for)."""
    from ..core.errors import check

    check(cfg.finetune is not None, "QuantConfig.finetune", "QAT needs a budget; set finetune, e.g. {epochs: 2, lr: 1e-4}")
    return cfg.finetune


def learnable_scales(model: nn.Module) -> list[nn.Parameter]:
    """Every learnable (LSQ) weight and activation scale of the fake-quant layers in model."""
    out = []
    for m in fq_layers(model).values():
        for q in (m.wq, m.aq):
            if q is not None and q.learnable:
                out.append(q.scale)
    return out


def param_groups(model: nn.Module, train_cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: the model's other parameters at train_cfg.lr, then one group per
    layer's learnable scales, without weight decay, at the LSQ-balanced lr (module docstring)."""
    scales = {id(p) for p in learnable_scales(model)}
    groups: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in scales]}]
    adaptive = train_cfg.optimizer in _ADAPTIVE
    for m in fq_layers(model).values():
        rms_w = float(m.layer.weight.detach().pow(2).mean().sqrt())
        for q in (m.wq, m.aq):
            if q is None or not q.learnable:
                continue
            ratio = SCALE_LR_RATIO * float(q.scale.detach().mean()) / max(rms_w, EPS) if adaptive else 1.0
            groups.append({"params": [q.scale], "lr": train_cfg.lr * ratio, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class ScaleKeeper:
    """fit() hook: keep every learnable scale positive (>= EPS) after each optimizer step."""

    def __init__(self, scales: list[nn.Parameter]):
        self.scales = scales

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for s in self.scales:
            s.clamp_(min=EPS)


@register_training_hooks
def _keep_scales_positive(model: nn.Module) -> list:
    """A later fine-tuning stage (recipe ``finetune``) keeps LSQ scales positive too."""
    scales = learnable_scales(model)
    return [ScaleKeeper(scales)] if scales else []


def finetune(model: nn.Module, task: Task, cfg: QuantConfig, train_cfg: TrainConfig | None = None) -> FitResult:
    """Fine-tune the fake-quantized ``model`` in place; returns the trainer's record."""
    layers = fq_layers(model)
    train_cfg = train_cfg or qat_train_config(cfg)
    params, hooks = None, []
    if cfg.learnable_scales:
        for m in layers.values():
            m.wq.make_learnable()
            if m.aq is not None:
                m.aq.make_learnable()
        params = param_groups(model, train_cfg)
    # every compression already on the model (pruning masks, LSQ scales kept positive, ...)
    # holds through QAT: before, pruned weights drifted off zero here
    hooks = training_hooks(model)
    result = fit(model, task, train_cfg, hooks=hooks, params=params)
    model.eval()
    for m in layers.values():  # scales that follow the weights: match the final weights
        if not m.wq.learnable:
            m.wq.calibrate(m.layer.weight)
    return result

"""Calibration passes over a few batches of the task's data.

- ``calibrate_activations``: record each quantized layer's float input (exact min/max plus a
  random sample of values) and set its activation range with the configured observer.
- ``correct_bias``: empirical bias correction (Nagel et al. 2019): the mean output error that
  weight quantization adds per output channel is subtracted from the bias.
- ``input_channel_absmax``: per-input-channel max |x| of each layer (SmoothQuant statistics).

All passes run the model with fake quantization switched off, so every layer sees the float
model's activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.task import Task, call_model
from ..core.utils import eval_mode, model_device, removing, to_device
from .fake import FakeQuantLayer
from .observers import observe

SAMPLE_CAP = 1 << 20  # values kept per layer for percentile / MSE / entropy observers


def calibration_inputs(task: Task, n_batches: int) -> list[Any]:
    """The inputs of the first n batches of the train split (val if there is no train split)."""
    loader = task.train if task.train is not None else task.val
    out = []
    for i, (inputs, _) in enumerate(loader):
        if i >= n_batches:
            break
        out.append(inputs)
    return out


def fq_layers(model: nn.Module) -> dict[str, FakeQuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)}


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily run every FakeQuantLayer in float, in eval mode."""
    layers = fq_layers(model)
    saved = {n: m.enabled for n, m in layers.items()}
    with eval_mode(model):
        for m in layers.values():
            m.enabled = False
        try:
            yield
        finally:
            for n, m in layers.items():
                m.enabled = saved[n]


@torch.no_grad()
def run_inputs(model: nn.Module, batches: list[Any]) -> None:
    from ..core.progress import track

    device = model_device(model)
    for inputs in track(batches, "calibration batches", total=len(batches)):
        call_model(model, to_device(inputs, device))


def _layer_input(m: FakeQuantLayer, x: torch.Tensor) -> torch.Tensor:
    return x if m.input_divisor is None else x / m._divisor(x)


class _Recorder:
    """Exact min/max and a uniform random sample (at most SAMPLE_CAP values) of one input."""

    def __init__(self, per_batch: int, gen: torch.Generator):
        self.per_batch, self.gen = per_batch, gen
        self.lo, self.hi, self.samples = float("inf"), float("-inf"), []

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        self.lo, self.hi = min(self.lo, flat.min().item()), max(self.hi, flat.max().item())
        if flat.numel() > self.per_batch:
            idx = torch.randint(flat.numel(), (self.per_batch,), generator=self.gen).to(flat.device)
            flat = flat[idx]
        self.samples.append(flat.cpu())


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: list[Any], method: str, param: float | None, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Set the range of every static ActQuantizer from the float inputs; return name -> (lo, hi)."""
    layers = {n: m for n, m in fq_layers(model).items() if m.aq is not None and not m.aq.dynamic}
    gen = torch.Generator().manual_seed(seed)
    recs = {n: _Recorder(max(SAMPLE_CAP // max(len(batches), 1), 1), gen) for n in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: recs[n].add(_layer_input(mod, args[0])))
             for n, m in layers.items()]
    with removing(hooks), float_mode(model):
        run_inputs(model, batches)
    ranges = {}
    for n, m in layers.items():
        rec = recs[n]
        if method == "minmax":
            lo, hi = (rec.lo, rec.hi) if not m.aq.symmetric else (-max(-rec.lo, rec.hi), max(-rec.lo, rec.hi))
        else:
            lo_t, hi_t = observe(torch.cat(rec.samples), method, m.aq.bits, m.aq.symmetric, param)
            lo, hi = lo_t.item(), hi_t.item()
        m.aq.set_range(lo, hi)
        ranges[n] = (lo, hi)
    return ranges


@torch.no_grad()
def input_channel_absmax(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any]) -> dict[str, torch.Tensor]:
    """max |x| per input channel (last dim for Linear, dim 1 for convs) of each named layer."""
    stats: dict[str, torch.Tensor] = {}

    def hook(mod, args, name):
        x = args[0].detach().abs().float()
        inner = getattr(mod, "layer", mod)
        dims = [d for d in range(x.dim()) if d != (x.dim() - 1 if isinstance(inner, nn.Linear) else 1)]
        cur = x.amax(dim=dims)
        stats[name] = cur if name not in stats else torch.maximum(stats[name], cur)

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in layers.items()]
    with removing(hooks), float_mode(model):
        run_inputs(model, batches)
    return stats


@torch.no_grad()
def correct_bias(model: nn.Module, batches: list[Any]) -> dict[str, float]:
    """Subtract E[(W_q - W) x] per output channel from each quantized layer's bias; return the
    largest correction per layer (layers without a bias get one)."""
    layers = {n: m for n, m in fq_layers(model).items() if m.enabled}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(mod: FakeQuantLayer, args, name):
        x = _layer_input(mod, args[0])
        dw = mod.quantized_weight() - mod.layer.weight
        err = F.linear(x, dw) if isinstance(mod.layer, nn.Linear) else mod.layer._conv_forward(x, dw, None)
        ch = err.dim() - 1 if isinstance(mod.layer, nn.Linear) else 1
        err = err.movedim(ch, -1).reshape(-1, err.shape[ch])
        sums[name] = sums.get(name, 0) + err.sum(0)
        counts[name] = counts.get(name, 0) + err.shape[0]

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in layers.items()]
    with removing(hooks), float_mode(model):
        run_inputs(model, batches)
    out = {}
    for n, m in layers.items():
        if n not in sums:
            continue
        mean_err = sums[n] / counts[n]
        if m.layer.bias is None:
            m.layer.bias = nn.Parameter(torch.zeros_like(mean_err))
        m.layer.bias.data -= mean_err.to(m.layer.bias.dtype)
        out[n] = mean_err.abs().max().item()
    return out

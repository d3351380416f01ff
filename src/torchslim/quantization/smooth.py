"""Float-equivalent rewrites that make a model easier to quantize.

- ``fold_batchnorm``: Conv/Linear -> BatchNorm becomes one Conv/Linear (as every real int8
  backend does), using torch's own ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``.
- ``equalize``: cross-layer equalization (Nagel et al. 2019): for layer1 -> ReLU -> layer2,
  scale layer1's output channel i by 1/s_i and layer2's input channel i by s_i with
  s_i = sqrt(r1_i / r2_i), so both layers' per-channel ranges match (ReLU(x/s) = ReLU(x)/s).
- ``smooth_quant``: SmoothQuant (Xiao et al. 2023): move activation outliers into the weights,
  x' = x / s, W' = W * s per input channel, s_j = max|x_j|^a / max|W_j|^(1-a).

Which layer feeds which is found without tracing (HF models resist torch.fx): during one
forward pass, every leaf module's output tensor is remembered by identity and matched to the
next leaf module's input. Because a functional use of a tensor (``y + x``) is invisible to hooks,
each rewrite is checked numerically on the batch and undone if the outputs moved.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..core.task import call_model
from ..core.utils import eval_mode, model_device, removing, to_device
from .calibrate import fq_layers, input_channel_absmax

PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout)  # positive-homogeneous, elementwise
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def trace_edges(model: nn.Module, inputs: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(consumer -> producer, producer -> consumers) between leaf modules on one forward pass."""
    names = {m: n for n, m in model.named_modules() if not list(m.children())}
    made_by: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keeps outputs alive so their ids are not reused
    producer: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}

    def pre(mod, args):
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in made_by:
            p = made_by[id(args[0])]
            producer[names[mod]] = p
            consumers.setdefault(p, []).append(names[mod])

    def post(mod, args, out):
        if isinstance(out, torch.Tensor):
            made_by[id(out)] = names[mod]
            keep.append(out)

    hooks = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    with eval_mode(model), removing(hooks):
        call_model(model, to_device(inputs, model_device(model)))
    return producer, consumers


@torch.no_grad()
def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    from ..core.task import as_tensor

    model.eval()
    return as_tensor(call_model(model, to_device(inputs, model_device(model)))).float()


def _unchanged(before: torch.Tensor, model: nn.Module, inputs: Any, rtol: float = 1e-3) -> bool:
    after = _output(model, inputs)
    return bool((after - before).abs().max() <= rtol * before.abs().max().clamp_min(1e-6))


@torch.no_grad()
def fold_batchnorm(model: nn.Module, inputs: Any) -> tuple[nn.Module, list[str]]:
    """Fold each BatchNorm fed only by a Conv/Linear into it; return (model, folded BN names)."""
    before = _output(model, inputs)
    producer, consumers = trace_edges(model, inputs)
    folded_model = copy.deepcopy(model)
    folded = []
    for bn_name, p in producer.items():
        bn, layer = folded_model.get_submodule(bn_name), folded_model.get_submodule(p)
        if not isinstance(bn, BNS) or consumers.get(p) != [bn_name] or not bn.track_running_stats:
            continue
        if isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer.eval(), bn.eval())
        elif isinstance(layer, LAYERS):
            fused = fuse_conv_bn_eval(layer.eval(), bn.eval())
        else:
            continue
        folded_model.set_submodule(p, fused)
        folded_model.set_submodule(bn_name, nn.Identity())
        folded.append(bn_name)
    if folded and not _unchanged(before, folded_model, inputs):
        return model, []
    return folded_model, folded


def _chains(model: nn.Module, producer: dict[str, str], consumers: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(layer1, layer2) pairs joined only through PASS_THROUGH modules, each link single-use."""
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LAYERS) or getattr(mod, "groups", 1) != 1:
            continue
        cur = producer.get(name)
        while cur is not None and isinstance(model.get_submodule(cur), PASS_THROUGH) and len(consumers.get(cur, [])) == 1:
            cur = producer.get(cur)
        if cur is None or cur == name or not isinstance(model.get_submodule(cur), LAYERS):
            continue
        if len(consumers.get(cur, [])) == 1:
            pairs.append((cur, name))
    return pairs


def _in_channel_absmax(w: torch.Tensor) -> torch.Tensor:
    return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


@torch.no_grad()
def equalize(model: nn.Module, inputs: Any, iterations: int = 2) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Cross-layer equalization of every layer -> ReLU -> layer pair; return (model, pairs)."""
    before = _output(model, inputs)
    pairs = _chains(model, *trace_edges(model, inputs))
    out = copy.deepcopy(model)
    for _ in range(iterations):
        for a, b in pairs:
            l1, l2 = out.get_submodule(a), out.get_submodule(b)
            r1 = l1.weight.abs().reshape(l1.weight.shape[0], -1).amax(dim=1)
            r2 = _in_channel_absmax(l2.weight)
            if r1.shape != r2.shape:
                continue
            s = torch.sqrt(r1 / r2.clamp_min(1e-12)).clamp(1e-4, 1e4)
            s = torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))
            l1.weight.div_(s.reshape(-1, *([1] * (l1.weight.dim() - 1))))
            if l1.bias is not None:
                l1.bias.div_(s)
            l2.weight.mul_(s.reshape(1, -1, *([1] * (l2.weight.dim() - 2))))
    if pairs and not _unchanged(before, out, inputs):
        return model, []
    return out, pairs


@torch.no_grad()
def smooth_quant(model: nn.Module, batches: list[Any], alpha: float) -> dict[str, float]:
    """SmoothQuant every activation-quantized FakeQuantLayer in place; return name -> max s."""
    layers = {n: m for n, m in fq_layers(model).items() if m.aq is not None}
    stats = input_channel_absmax(model, layers, batches)
    out = {}
    for n, m in layers.items():
        if n not in stats:
            continue
        w = m.layer.weight
        a = stats[n].to(w.device).clamp_min(1e-5)
        s = (a.pow(alpha) / _in_channel_absmax(w).clamp_min(1e-5).pow(1 - alpha)).clamp(1e-5, 1e5)
        w.mul_(s.reshape(1, -1, *([1] * (w.dim() - 2))))
        m.input_divisor = s
        m.wq.calibrate(w)
        out[n] = s.max().item()
    return out

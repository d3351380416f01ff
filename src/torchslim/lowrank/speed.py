"""Is a factorized pair really faster than the layer it replaces? Timed, not assumed.

Fewer MACs do not make a layer faster in eager PyTorch: two thin kernels cost two launches and
two passes over the activations, and for a small layer (the 1x1 convs of a depthwise-separable
CNN) that overhead is most of the time; a gallery MobileNet-style CNN ran 3.4x slower after
low-rank at half its MACs. So each candidate pair is timed against its original on the input the
layer really sees (captured by a hook on a real batch), interleaved so that CPU contention hits
both alike, and kept only when its median is at least ``margin`` faster.

Written by hand because the question is this one narrow comparison (one module against another
on one tensor, a few ms each); torch.utils.benchmark.Timer would do the loop but not the
interleaving.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ..core.task import call_model
from ..core.utils import eval_mode, model_device, removing, to_device


def hooked_forward(model: nn.Module, hooks: list[tuple[nn.Module, Any]], inputs: Any, pre: bool = False) -> None:
    """One no-grad eval forward of inputs with each (module, hook) attached (forward hooks, or
    pre-hooks with ``pre``); the mode is restored and the hooks removed after."""
    register = (lambda m, h: m.register_forward_pre_hook(h)) if pre else (lambda m, h: m.register_forward_hook(h))
    with removing([register(m, h) for m, h in hooks]), eval_mode(model), torch.no_grad():
        call_model(model, to_device(inputs, model_device(model)))


def layer_inputs(model: nn.Module, mods: dict[str, nn.Module], inputs: Any) -> dict[str, torch.Tensor]:
    """The first input each named module sees on one forward of inputs (detached)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: Any) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach()
        return fn

    hooked_forward(model, [(m, hook(n)) for n, m in mods.items()], inputs, pre=True)
    return seen


def _once(mod: nn.Module, x: torch.Tensor, loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        mod(x)
    return (time.perf_counter() - start) / loops


@torch.no_grad()
def compare(original: nn.Module, pair: nn.Module, x: torch.Tensor, repeats: int = 15) -> tuple[float, float]:
    """(median seconds of original, of pair) on x, interleaved, after a warm-up."""
    loops = 1
    while _once(original, x, loops) * loops < 2e-3 and loops < 4096:  # each sample >= ~2 ms
        loops *= 2
    for m in (original, pair):
        _once(m, x, 2)
    a, b = [], []
    for _ in range(repeats):
        a.append(_once(original, x, loops))
        b.append(_once(pair, x, loops))
    return statistics.median(a), statistics.median(b)


def is_faster(original: nn.Module, pair: nn.Module, x: torch.Tensor, margin: float) -> tuple[bool, str]:
    """(pair at least ``margin`` faster than original on x, the measured figures as text)."""
    t_orig, t_pair = compare(original, pair, x)
    ok = t_pair <= (1 - margin) * t_orig
    text = (f"measured {t_pair * 1e6:.0f} us for the pair vs {t_orig * 1e6:.0f} us for the layer "
            f"(eager, {torch.get_num_threads()} threads, input {tuple(x.shape)})")
    return ok, text

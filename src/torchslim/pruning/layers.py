"""Whole-layer / block removal: replace a block by an identity where its input and output shapes
match, and refuse (naming the layer) where they do not.

Layer importance is what bypassing it costs: the drop of the task metric on a split
("metric"), or the relative change of the model's outputs ("output", needs no labels). Hand-
written because no installed library removes whole blocks; the mechanics are a shape check and
a ``setattr``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.bounds import bounded, check_bounds
from ..core.config_base import config
from ..core.errors import ConfigError, check
from ..core.selection import Layers, layers_field
from ..core.stage import StageResult, register_stage
from ..core.task import Task, as_tensor, call_model
from ..core.utils import eval_mode, model_device, removing, to_device

CRITERIA = ("metric", "output")


class Bypass(nn.Module):
    """Identity standing in for a removed block: returns its first input, ignores the rest."""

    def __init__(self, removed: str = ""):
        super().__init__()
        self.removed = removed

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))

    def extra_repr(self) -> str:
        return f"removed={self.removed!r}"


@config(renamed={"candidates": "layers: [...] (the blocks to consider)"})
class LayerDropConfig:
    """drop: names of blocks to remove (as in ``model.named_modules()``), or give
    count: how many of the least important candidate blocks to remove. Candidates are the
    shape-preserving items of the model's nn.Sequential / nn.ModuleList containers that
    ``layers`` selects (a LayerSelection: glob patterns over those block names; exact names
    may name any module). criterion: "metric" (metric drop on ``split``) or "output"
    (relative L2 change of the outputs on ``batches`` batches of ``split``)."""

    drop: tuple[str, ...] = ()
    count: int = bounded(0, 0, 100_000, integer=True)
    layers: Layers = layers_field()
    criterion: str = "output"
    split: str = "val"
    batches: int = bounded(4, 1, 100_000, integer=True)

    def __post_init__(self) -> None:
        check_bounds(self)
        f = "LayerDropConfig"
        check(all(isinstance(n, str) and n for n in self.drop), f"{f}.drop", "block names must be non-empty strings")
        check(isinstance(self.count, int) and self.count >= 0, f"{f}.count", f"must be an integer >= 0, got {self.count!r}")
        check(bool(self.drop) != (self.count > 0), f"{f}.drop",
              "give either drop (the block names to remove; before issue 11 this was `layers`) or count > 0, "
              "not both or neither")
        check(self.criterion in CRITERIA, f"{f}.criterion", f"unknown criterion {self.criterion!r}; use one of {', '.join(CRITERIA)}")
        check(self.split in ("train", "val", "test"), f"{f}.split", f"must be train, val or test, got {self.split!r}")
        check(isinstance(self.batches, int) and self.batches >= 1, f"{f}.batches", f"must be an integer >= 1, got {self.batches!r}")


def io_shapes(model: nn.Module, names: list[str], inputs: Any) -> dict[str, tuple[Any, Any]]:
    """name -> (shape of first input, shape of output) on one forward of inputs."""
    seen: dict[str, tuple[Any, Any]] = {}

    def hook(name: str):
        def fn(mod, args, kwargs, out):
            first = args[0] if args else next(iter(kwargs.values()), None)
            shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            seen.setdefault(name, (shape(first), shape(out)))
        return fn

    hooks = [model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    with removing(hooks), torch.no_grad():
        call_model(model, inputs)
    return seen


def default_candidates(model: nn.Module) -> list[str]:
    """Items of every nn.Sequential / nn.ModuleList (the natural 'blocks' of a model)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            out += [f"{name}.{k}" if name else k for k, _ in mod.named_children()]
    return out


def _candidates(model: nn.Module, cfg: LayerDropConfig) -> list[str]:
    """The blocks ``cfg.layers`` selects: exact names as given, else the default candidates
    (the items of nn.Sequential / nn.ModuleList containers) that its patterns match."""
    inc = cfg.layers.include
    if inc != ("*",) and not any(c in p for p in inc for c in "*?["):
        return [n for n in inc if cfg.layers.named(n)]
    mods = dict(model.named_modules())
    return [n for n in default_candidates(model) if cfg.layers.matches(n, mods[n])]


def removable(model: nn.Module, names: list[str], inputs: Any) -> dict[str, str | None]:
    """name -> None if it can be bypassed, else why not."""
    shapes = io_shapes(model, names, inputs)
    why = {}
    for n in names:
        if not any(True for _ in model.get_submodule(n).parameters()):
            why[n] = "it has no weights (removing it saves nothing)"
        elif n not in shapes:
            why[n] = "it does not run in the forward pass"
        elif shapes[n][0] != shapes[n][1]:
            why[n] = f"its input {shapes[n][0]} and output {shapes[n][1]} differ, so an identity cannot replace it"
        else:
            why[n] = None
    return why


def bypass(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace each named submodule by a Bypass, in place. A layer of nn.TransformerEncoder /
    Decoder is deleted from its ModuleList instead (and num_layers lowered): their forward
    reads ``layers[0].self_attn`` to choose a fast path, so a Bypass there would break it."""
    owners = {f"{n}.layers" if n else "layers": m for n, m in model.named_modules()
              if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder))}
    drop: dict[str, list[int]] = {}
    for n in names:
        parent, _, child = n.rpartition(".")
        if parent in owners and child.isdigit():
            drop.setdefault(parent, []).append(int(child))
        else:
            setattr(model.get_submodule(parent) if parent else model, child, Bypass(n))
    for parent, idxs in drop.items():
        layers = model.get_submodule(parent)
        for i in sorted(idxs, reverse=True):
            del layers[i]
        owners[parent].num_layers = len(layers)
    return model


def _outputs(model: nn.Module, task: Task, split: str, batches: int) -> tuple[list, list]:
    device = model_device(model)
    outs, tgts = [], []
    with torch.no_grad():
        for i, (inputs, targets) in enumerate(task.split(split)):
            if i >= batches:
                break
            outs.append(as_tensor(call_model(model, to_device(inputs, device))).float().cpu())
            tgts.append(targets)
    return outs, tgts


def layer_importance(model: nn.Module, names: list[str], cfg: LayerDropConfig, task: Task) -> dict[str, float]:
    """What bypassing each layer alone costs (higher = more important)."""
    with eval_mode(model):
        if cfg.criterion == "metric":
            base = task.evaluate(model, cfg.split)
        else:
            ref, _ = _outputs(model, task, cfg.split, cfg.batches)
        scores = {}
        for n in names:
            trial = bypass(copy.deepcopy(model), [n]).eval()
            if cfg.criterion == "metric":
                scores[n] = base - task.evaluate(trial, cfg.split)
            else:
                out, _ = _outputs(trial, task, cfg.split, cfg.batches)
                num = sum((a - b).pow(2).sum() for a, b in zip(out, ref))
                scores[n] = float((num / sum(b.pow(2).sum() for b in ref).clamp_min(1e-12)).sqrt())
    return scores


def _nested(a: str, b: str) -> bool:
    return a.startswith(b + ".") or b.startswith(a + ".")


def drop_layers(model: nn.Module, cfg: LayerDropConfig, task: Task) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of model with the chosen blocks bypassed, and the record of why."""
    model = copy.deepcopy(model)
    inputs = to_device(task.example_inputs(batch_size=2), model_device(model))
    known = dict(model.named_modules())
    asked = list(cfg.drop) or _candidates(model, cfg)
    missing = [n for n in asked if n not in known]
    if missing:
        field = "drop" if cfg.drop else "layers"
        raise ConfigError(f"LayerDropConfig.{field}: no module named {missing[0]!r} in the model")
    why = removable(model, asked, inputs)
    if cfg.drop:
        bad = [n for n in cfg.drop if why[n] is not None]
        if bad:
            raise ConfigError(f"LayerDropConfig.drop: cannot remove {bad[0]!r}: {why[bad[0]]}")
        chosen, scores = list(cfg.drop), {}
    else:
        ok = [n for n in asked if why[n] is None]
        check(len(ok) >= cfg.count, "LayerDropConfig.count",
              f"only {len(ok)} shape-preserving blocks can be removed ({', '.join(ok) or 'none'}); lower count")
        scores = layer_importance(model, ok, cfg, task)
        chosen = []
        for n in sorted(ok, key=lambda n: scores[n]):  # least important first, never nested
            if len(chosen) < cfg.count and not any(_nested(n, c) for c in chosen):
                chosen.append(n)
    params_before = sum(p.numel() for p in model.parameters())
    bypass(model, chosen)
    info = {"removed": chosen, "importance": scores, "not_removable": {n: w for n, w in why.items() if w},
            "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters())}
    return model, info


@register_stage(LayerDropConfig, copy_input=False)  # drop_layers works on its own copy
def apply(model: nn.Module, cfg: LayerDropConfig, task: Task) -> StageResult:
    """Stage entry point: a copy with whole blocks replaced by identities."""
    dropped, info = drop_layers(model, cfg, task)
    return StageResult(dropped, info)

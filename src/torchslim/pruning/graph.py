"""Which channels are coupled, and the surgery that removes them (on top of Torch-Pruning).

Torch-Pruning's ``DependencyGraph`` traces the model once and returns *groups*: a conv/linear's
output channels together with the BatchNorm after it, the next layers' inputs and both sides of
every residual add. We use it as is. What we add, and why:

- ``safe_groups`` drops groups Torch-Pruning would get wrong: groups that touch a parameter owned
  by an unknown (custom) module, a recurrent layer, or a weight tied to another layer (it would
  silently resize one side of the tie). Those layers are named in a warning instead.
- a *plan* (root layer name -> output-channel indices) that can be applied twice: by physical
  removal (``prune_plan``) and by masking (``mask_plan``: the channels' weights, bias and norm
  affine set to zero, so they output exactly 0). Equal outputs of the two prove the surgery.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.errors import ConfigError, check
from ..core.task import call_model
from ..core.utils import removing

Plan = dict[str, list[int]]
if TYPE_CHECKING:
    import torch_pruning as tp


def torch_pruning():
    """torch_pruning, imported on first use: it is an optional extra, and ``import torchslim``
    must work without it (the other techniques do not need it)."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError("StructuredPruneConfig: structured pruning needs the 'prune' extra "
                          "(torch-pruning); install it with: pip install 'torchslim[prune]'") from None
    return tp


ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
# Parameter-owning layer types Torch-Pruning resizes correctly (anything else is "custom").
KNOWN_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
               nn.GroupNorm, nn.PReLU, nn.Embedding, nn.modules.instancenorm._InstanceNorm)
RNN_TYPES = (nn.RNNBase,)


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Trace model once (Torch-Pruning needs autograd, so grad is forced on). A model its
    tracer cannot follow is refused in one line (the model is a copy; nothing was changed)."""
    try:
        with torch.enable_grad():
            return torch_pruning().DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, forward_fn=call_model, verbose=False)
    except (RuntimeError, AttributeError, TypeError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ConfigError(f"StructuredPruneConfig: Torch-Pruning cannot trace {type(model).__name__} "
                          f"({type(exc).__name__}: {first}); for transformers use transformer_prune "
                          "(heads / FFN) or layer_drop") from None


# attributes that mark a module splitting its projections into attention heads
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_key_value_heads")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that split their projections into heads (nn.MultiheadAttention, Hugging Face
    self-attention): their Q/K/V/output widths are tied to num_heads x head_dim by a reshape
    that Torch-Pruning cannot see, so channel pruning there breaks the view at run time."""
    out = {}
    for name, mod in model.named_modules():
        if any(isinstance(getattr(mod, a, None), int) for a in HEAD_ATTRS) and any(
                isinstance(c, (nn.Linear, nn.modules.conv._ConvNd)) or type(c).__name__ == "Conv1D"
                for c in mod.modules() if c is not mod) or isinstance(mod, nn.MultiheadAttention):
            out[name] = mod
    return out


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def classifier_layer(model: nn.Module, example_inputs: Any) -> nn.Module | None:
    """The last Conv/Linear run in a forward pass: its outputs are the model's outputs."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if isinstance(m, ROOT_TYPES)]
    with removing(hooks), torch.no_grad():
        call_model(model, example_inputs)
    return order[-1] if order else None


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """name -> reason for layers whose channels we must not touch (custom, RNN, tied)."""
    out: dict[str, str] = {}
    owner: dict[int, str] = {}
    for att_name, att in attention_modules(model).items():
        for sub, child in att.named_modules():
            if sub and any(True for _ in child.parameters(recurse=False)):
                out[f"{att_name}.{sub}" if att_name else sub] = (
                    f"attention projection of {att_name or '<model>'} (split into heads; use transformer_prune)")
    for name, mod in model.named_modules():
        if name in out:
            continue
        own = list(mod.named_parameters(recurse=False))
        if isinstance(mod, RNN_TYPES):
            out[name] = "recurrent layer"
        elif own and not isinstance(mod, KNOWN_TYPES):
            out[name] = f"custom module {type(mod).__name__} with its own parameters"
        for _, p in own:
            if id(p) in owner and owner[id(p)] != name:
                out[name] = f"weight tied to {owner[id(p)]}"
                out.setdefault(owner[id(p)], f"weight tied to {name}")
            owner.setdefault(id(p), name)
    return out


def safe_groups(model: nn.Module, dg: tp.DependencyGraph, ignored: Iterable[nn.Module],
                warn: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """Prunable groups keyed by root layer name, and the layers left alone (name -> why)."""
    names = module_names(model)
    bad = unsupported_layers(model)
    bad_mods = {m for m, n in names.items() if n in bad}
    skipped = dict(bad)
    groups: dict[str, Any] = {}
    for group in dg.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES):
        root = names[group[0].dep.target.module]
        touched = [d.target.module for d, _ in group]
        unsafe = [t for t in touched if t in bad_mods or d_is_param(t)]
        if unsafe:
            culprit = names.get(unsafe[0], "an unwrapped parameter")
            skipped.setdefault(root, f"coupled to {culprit}")
            continue
        groups[root] = group
    if warn and skipped:
        listed = "; ".join(f"{n or '<model>'} ({why})" for n, why in sorted(skipped.items()))
        warnings.warn(f"structured pruning skipped layers it cannot resize safely: {listed}", stacklevel=3)
    return groups, skipped


def d_is_param(target: Any) -> bool:
    return isinstance(target, nn.Parameter)


def group_size(group: Any) -> int:
    return len(group[0][1])


def _regroup(model: nn.Module, dg: tp.DependencyGraph, root: str, idxs: list[int]) -> Any:
    layer = model.get_submodule(root)
    return dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels, idxs)


def prune_plan(model: nn.Module, plan: Plan, example_inputs: Any,
               dg: tp.DependencyGraph | None = None) -> nn.Module:
    """Physically remove the planned channels (in place) and return model (``dg``: a graph
    already traced on this very model, to save a trace)."""
    dg = dg or build_graph(model, example_inputs)
    for root, idxs in plan.items():
        if idxs:
            group = _regroup(model, dg, root, sorted(idxs))
            check(dg.check_pruning_group(group), "StructuredPruneConfig",
                  f"removing {len(idxs)} channels of {root} would leave a layer empty; keep more")
            group.prune()
    return model


@torch.no_grad()
def mask_plan(model: nn.Module, plan: Plan, example_inputs: Any) -> nn.Module:
    """Zero the planned channels in place (weights, bias, norm affine) without resizing.

    A masked channel then outputs exactly 0 after any norm, so a 0->0 activation (ReLU, GELU)
    passes 0 on and the next layer sees what the physically pruned model sees.
    """
    dg = build_graph(model, example_inputs)
    for root, idxs in plan.items():
        if not idxs:
            continue
        for dep, dep_idxs in _regroup(model, dg, root, sorted(idxs)):
            mod = dep.target.module
            if not dg.is_out_channel_pruning_fn(dep.handler) or not isinstance(mod, KNOWN_TYPES):
                continue
            index = torch.as_tensor(dep_idxs, dtype=torch.long)
            weight = getattr(mod, "weight", None)
            if isinstance(weight, torch.Tensor):
                dim = 1 if getattr(mod, "transposed", False) else 0
                weight.index_fill_(dim, index.to(weight.device), 0.0)
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.index_fill_(0, index.to(bias.device), 0.0)
    return model


def layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) channels of every Conv/Linear, for the before/after record."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
    return out

"""``torchslim.load(path, model)``: a weights file into its architecture, at the file's shapes.

After structured pruning (channels, FFN neurons, whole heads removed) the saved tensors are
smaller than the architecture they came from, so ``load_state_dict`` on a freshly built model
fails. Here every layer whose tensors in the file have other shapes is resized first (its
Parameters and buffers replaced by ones of the file's shapes, and the attributes its forward
reads, such as ``in_features`` or ``num_features``, updated), then the weights are loaded
strictly. Nothing is unpickled: the file is read by ``read_state_dict`` (safetensors, or a
torch file with ``weights_only=True``) and its checksum is verified.

Handled: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (depthwise groups follow the channels),
``nn.BatchNorm*``, ``nn.LayerNorm``, ``nn.GroupNorm`` (groups kept), ``nn.Embedding`` and
Hugging Face attention blocks whose head count the file implies (``num_attention_heads`` /
``attention_head_size`` / ``all_head_size``). Anything else with different shapes is refused
in one line naming the module, never loaded half-way (the model is untouched then).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..core.errors import WeightsError
from .weights import check_keys, read_state_dict

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _resize_params(mod: nn.Module, shapes: dict[str, torch.Size]) -> None:
    for name, shape in shapes.items():
        old = mod._parameters.get(name)
        if old is not None:
            mod._parameters[name] = nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad)
        elif mod._buffers.get(name) is not None:
            mod._buffers[name] = mod._buffers[name].new_empty(shape)


def _resize(name: str, mod: nn.Module, shapes: dict[str, torch.Size], path: str) -> None:
    """Resize one module to the file's shapes of its own tensors (raises WeightsError)."""
    w = shapes.get("weight")
    if isinstance(mod, nn.Linear) and w is not None:
        mod.out_features, mod.in_features = int(w[0]), int(w[1])
    elif isinstance(mod, _CONVS) and w is not None:
        if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:  # depthwise
            mod.in_channels = mod.out_channels = mod.groups = int(w[0])
        elif mod.groups == 1:
            mod.out_channels, mod.in_channels = int(w[0]), int(w[1])
        else:
            raise WeightsError(f"{path!r}: cannot resize grouped conv {name!r} (groups={mod.groups}) to {tuple(w)}")
    elif isinstance(mod, _NORMS):
        mod.num_features = int(next(iter(shapes.values()))[0])
    elif isinstance(mod, nn.LayerNorm):
        shape = shapes.get("weight") or shapes.get("bias")
        mod.normalized_shape = tuple(int(s) for s in shape)
    elif isinstance(mod, nn.GroupNorm):
        mod.num_channels = int(next(iter(shapes.values()))[0])
    elif isinstance(mod, nn.Embedding) and w is not None:
        mod.num_embeddings, mod.embedding_dim = int(w[0]), int(w[1])
    else:
        raise WeightsError(f"weights file {path!r}: {name or '<root>'} ({type(mod).__name__}) holds tensors of other "
                           f"shapes than the model ({', '.join(f'{k} {tuple(v)}' for k, v in shapes.items())}) "
                           "and torchslim.load cannot resize that layer type")
    _resize_params(mod, shapes)


def _fix_attention(model: nn.Module) -> None:
    """Hugging Face self-attention keeps its head count in attributes its forward reads."""
    for mod in model.modules():
        query = getattr(mod, "query", None) or getattr(mod, "q_proj", None)
        size = getattr(mod, "attention_head_size", None) or getattr(mod, "head_dim", None)
        if not isinstance(query, nn.Linear) or not isinstance(size, int) or size <= 0:
            continue
        heads = query.out_features // size
        for attr in ("num_attention_heads", "num_heads"):
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, heads)
        if isinstance(getattr(mod, "all_head_size", None), int):
            mod.all_head_size = heads * size


def load(path: str | Path, model: nn.Module) -> nn.Module:
    """Load the weights file at path into model (in place), resizing layers to the file's
    shapes first; returns model. WeightsError (one line) when a key is missing or unexpected,
    or a layer of another shape cannot be resized."""
    state = read_state_dict(path)
    own = model.state_dict()
    check_keys(state, own, path)
    changed: dict[str, dict[str, torch.Size]] = {}
    for key, value in state.items():
        if own[key].shape != value.shape:
            mod_name, _, tensor = key.rpartition(".")
            changed.setdefault(mod_name, {})[tensor] = value.shape
    if changed:
        trial = copy.deepcopy(model)  # resize a copy first: a refusal leaves the model untouched
        for mod_name, shapes in changed.items():
            _resize(mod_name, trial.get_submodule(mod_name), shapes, str(path))
        for mod_name, shapes in changed.items():
            _resize(mod_name, model.get_submodule(mod_name), shapes, str(path))
        _fix_attention(model)
    model.load_state_dict(state)
    return model

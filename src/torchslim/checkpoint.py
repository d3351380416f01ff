"""Whole-module checkpoints that also hold parametrized modules (e.g. shared weights).

``torch.save(model)`` refuses modules with parametrizations because their class is generated
at run time. Here such a module is pickled as (its original class, its ``__dict__``) and rebuilt
by re-injecting the generated class and properties, exactly as ``register_parametrization``
does. Only for the runner's own checkpoints: loading unpickles (``weights_only=False``), so it
is never used on files a user hands in.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .utils import atomic_write


def _rebuild_parametrized(base: type, state: dict) -> nn.Module:
    module = base.__new__(base)
    module.__dict__.update(state)
    parametrize._inject_new_class(module)
    for name in module.parametrizations:
        parametrize._inject_property(module, name)
    return module


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, nn.Module) and parametrize.is_parametrized(obj):
            return _rebuild_parametrized, (type(obj).__bases__[0], obj.__dict__)
        return NotImplemented


_pickle_module = types.SimpleNamespace(Pickler=_Pickler, Unpickler=pickle.Unpickler, __name__="pickle",
                                       load=pickle.load, dump=pickle.dump)


def save_module(model: nn.Module, path: str | Path) -> Path:
    """Atomically write the whole module (structure + tensors), parametrizations included."""
    return atomic_write(path, lambda p: torch.save(model, p, pickle_module=_pickle_module))


def load_module(path: str | Path) -> nn.Module:
    """Read a module written by save_module (trusted files only: this unpickles)."""
    return torch.load(path, map_location="cpu", weights_only=False)

"""Whole-module checkpoints that also hold parametrized modules (e.g. shared weights).

``torch.save(model)`` refuses modules with parametrizations because their class is generated
at run time. Here such a module is pickled as (its original class, its ``__dict__``) and rebuilt
by re-injecting the generated class and properties, exactly as ``register_parametrization``
does.

Loading never runs arbitrary pickled code, although a checkpoint sits in an output folder that
anyone may have written to (issue 12: a planted ``.state/model.pt`` ran its payload on
``--resume``). ``load_module`` reads with ``torch.load(weights_only=True)``, which can build
only the globals it is given; we give it exactly the globals the file names (found by a static
scan of the pickle, nothing executed) and only when each passes ``_allowed``:

- a subclass of ``nn.Module``, or a Hugging Face ``PretrainedConfig``, from a module that is
  already imported or belongs to torch, torchslim or transformers (a name from any other module
  is refused *without importing it*: importing runs its code); torch's code-carrying module
  kinds (fx graphs, TorchScript, packages, export) are refused;
- a pure tensor function of ``torch._C._nn`` / ``torch.nn.functional`` (activations held as
  attributes, e.g. BERT's ``gelu``);
- this file's own ``_rebuild_parametrized``.

So a crafted file can at most build instances of those classes with odd state, never call
``os.system``. (The alternative the issue names, safetensors plus a JSON description of the
module tree, needs a rebuild recipe per technique; weights_only with this allowlist covers every
technique's model today, so we keep one format and say why here.)
"""

from __future__ import annotations

import importlib
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import TorchslimError
from ..core.utils import atomic_write

_TRUSTED_PACKAGES = ("torch", "torchslim", "transformers")
_REFUSED_PREFIXES = ("torch.fx", "torch.jit", "torch._dynamo", "torch.export", "torch._export",
                     "torch.package", "torch.hub", "torch.utils.data")
_TENSOR_FUNCTION_MODULES = ("torch._C._nn", "torch.nn.functional")


class CheckpointError(TorchslimError):
    """A checkpoint is damaged or names code that torchslim will not load."""


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


def _resolve(name: str) -> Any:
    """The object a checkpoint's global name refers to, if _allowed; else CheckpointError."""
    module_name, _, attr = name.rpartition(".")
    why = None
    if not module_name or name.startswith(_REFUSED_PREFIXES):
        why = "not a module class torchslim loads"
    elif module_name not in sys.modules and module_name.split(".")[0] not in _TRUSTED_PACKAGES:
        why = f"its module {module_name!r} is not imported (importing it would run its code)"
    if why is None:
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            obj, why = None, "it does not exist here"
        if obj is not None and _allowed(obj, module_name):
            return obj
        why = why or "it is not an nn.Module or config class (a function or other callable)"
    raise CheckpointError(f"checkpoint refused: it names {name!r}, and {why}; nothing was loaded")


def _allowed(obj: Any, module_name: str) -> bool:
    if obj is _rebuild_parametrized:
        return True
    if isinstance(obj, type):
        if issubclass(obj, nn.Module):
            return not obj.__module__.startswith(_REFUSED_PREFIXES)
        config = sys.modules.get("transformers")
        return config is not None and issubclass(obj, config.PretrainedConfig)
    return module_name in _TENSOR_FUNCTION_MODULES and callable(obj)


def load_module(path: str | Path) -> nn.Module:
    """Read a module written by save_module, building only allowlisted globals (module doc)."""
    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged or not a torchslim checkpoint "
                              f"({type(exc).__name__})") from None
    allowed = [_resolve(n) for n in names]
    try:
        with torch.serialization.safe_globals(allowed):
            model = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} refused: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(model).__name__}, not a module")
    return model

"""Small shared helpers: seeding, atomic writes, device moves."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator seeded the same (for loaders)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_path) then rename tmp_path onto path, so readers never see a partial file.
    The file gets the mode a plain ``open`` would give (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move a tensor, or a dict/tuple/list of tensors, to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        return batch_size_of(next(iter(inputs.values())))
    return batch_size_of(inputs[0])


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def console():
    """A rich Console that keeps wide tables readable when output is not a terminal (CI, logs)."""
    from rich.console import Console

    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, training: bool = False):
    """Run the block with ``model.train(training)`` (eval by default), then give every submodule
    back its own mode, whatever happened in it: a model in train mode whose BatchNorm layers a
    user froze in eval keeps them in eval (``model.train(was)`` would switch them back to train).
    A module added inside the block takes the model's own mode. torch has no such context
    manager (``torch.no_grad`` is about autograd, not the module mode), and the save/restore was
    written by hand in 20 places."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        model.train(modes[0][1])  # through train(): a module's own train() override still runs
        for module, was in modes:
            module.training = was  # what nn.Module.train sets, for this module alone


def jsonable(obj: Any) -> Any:
    """obj as plain JSON data: dataclasses as dicts, tuples as lists, non-finite floats as None
    (JSON has no inf/NaN), one-element tensors as numbers, modules and other objects by name."""
    import dataclasses
    import math

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        try:
            return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        except Exception:  # noqa: BLE001 - a dataclass holding something unreadable
            return repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return jsonable(obj.item())
    if isinstance(obj, torch.nn.Module):
        return f"<{type(obj).__name__}>"
    return repr(obj)


@contextlib.contextmanager
def removing(handles):
    """Run the block, then remove the given hook handles, whatever happened in it."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def materialize_parametrized(module: torch.nn.Module | list[torch.nn.Module]) -> list[str]:
    """Turn every parametrized tensor (``torch.nn.utils.parametrize``: weight sharing's
    ``codebook[indices] * mask``, a user's weight norm) of module and its submodules, or of the
    modules of a list (not their submodules), into a plain Parameter (requires_grad False)
    holding the value it computes, in place; return the names.

    Not ``parametrize.remove_parametrizations``: a deep copy of a parametrized module shares the
    class torch generated for it with the original, and removing deletes the property from that
    class, i.e. from the original too (torch 2.13; the original then has no ``weight``). Each
    module gets its own base class back instead. Modules that computed one weight from one
    parametrization (tied users of a shared layer) get one Parameter, so the tie holds."""
    from torch.nn.utils import parametrize

    mods = module.named_modules() if isinstance(module, torch.nn.Module) else ((str(i), m) for i, m in enumerate(module))
    found = [(n, m) for n, m in mods if parametrize.is_parametrized(m)]
    made: dict[tuple, torch.nn.Parameter] = {}
    plan = []
    for name, mod in found:  # every value first: a tie's later user still reads the parametrization
        for tensor, plist in mod.parametrizations.items():
            key = (id(plist.original), *(id(p) for p in plist))
            if key not in made:
                made[key] = torch.nn.Parameter(getattr(mod, tensor).detach().clone(), requires_grad=False)
            plan.append((name, mod, tensor, made[key]))
    for _, mod, _, _ in plan:
        if "parametrizations" in mod._modules:
            del mod._modules["parametrizations"]
            mod.__class__ = type(mod).__bases__[0]
    for _, mod, tensor, value in plan:
        setattr(mod, tensor, value)
    return [f"{name}.{tensor}" if name else tensor for name, _, tensor, _ in plan]

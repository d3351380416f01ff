"""Exported form that really skips: TorchScript with the control flow kept.

``torch.jit.script`` compiles EarlyExitModel.forward (and CascadeModel's) with its loop, the
policy test and the row regrouping, so the saved file skips exactly as the eager model does. It
loads with plain ``torch.jit.load(path)`` — no torchslim import, no pickled Python code — and
``forward_with_exits`` stays callable on it. Chosen over ONNX-per-segment because one file
holds the segments, the heads, the thresholds and the driver logic, and ONNX Runtime is not a
dependency of this project.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ExportError
from ..core.utils import atomic_write


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    """The scripted eval-mode model (a copy; model is untouched)."""
    import copy

    m = copy.deepcopy(model).eval()
    if hasattr(m, "freeze_backbone"):
        del m.freeze_backbone  # a Python-only training flag
    m.__dict__.pop("_rule_cache", None)  # eager-only cache of the buffers' values (model.py)
    try:
        return torch.jit.script(m)
    except Exception as exc:  # noqa: BLE001 - a block TorchScript cannot compile
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ExportError(f"cannot compile {type(model).__name__} to TorchScript: {type(exc).__name__}: {first}") from None


def save_torchscript(model: nn.Module, path: str | Path) -> Path:
    """Write the scripted model atomically; load it with ``torch.jit.load(path)``."""
    scripted = to_torchscript(model)
    return atomic_write(path, lambda p: torch.jit.save(scripted, str(p)))


def scriptable_save(model: nn.Module) -> tuple[Callable[[nn.Module, str], None] | None, str]:
    """(a save function for StageResult, a note): None with the reason when scripting fails."""
    try:
        to_torchscript(model)
    except ExportError as exc:
        return None, f"not scriptable: {exc}"
    return (lambda m, path: save_torchscript(m, path) and None), "ok: save() writes TorchScript (torch.jit.load)"

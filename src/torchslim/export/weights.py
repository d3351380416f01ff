"""Loading and saving plain weights safely: safetensors, or torch files with weights_only=True.

A weights file is untrusted input: pickled code in it is refused, never executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..utils import atomic_write


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write model.state_dict() atomically (.safetensors by extension, else torch.save)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda p: save_file(state, str(p)))
    return atomic_write(path, lambda p: torch.save(state, p))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, refusing pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"weights file {str(path)!r} is not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(
            f"weights file {str(path)!r} refused: it holds pickled objects that weights_only=True "
            f"does not allow ({first[:120]}); save a plain state_dict or use .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"weights file {str(path)!r} cannot be read: {str(exc).splitlines()[0][:160]}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    return obj


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict into model; WeightsError naming the first mismatch."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise WeightsError(
            f"weights file {str(path)!r} does not match the model: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise WeightsError(
                f"weights file {str(path)!r} does not match the model: {k!r} has shape "
                f"{tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
            )
    model.load_state_dict(state)
    return model

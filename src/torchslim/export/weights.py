"""Loading and saving plain weights safely: safetensors, or torch files with weights_only=True.

A weights file is untrusted input: pickled code in it is refused, never executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..core.errors import WeightsError
from ..core.utils import atomic_write
from .digest import SAFETENSORS_KEY, check_state, stamp_state, tensor_digest


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model as it runs, under the names a plain model of the same
    architecture has: every parametrized tensor (shared weights, any
    ``torch.nn.utils.parametrize``) and ``torch.nn.utils.prune`` reparametrization becomes the
    tensor it computes; the internals (``parametrizations.*``, codebooks, ``*_orig``/``*_mask``)
    are dropped. The model is untouched (nothing is removed from it: a removal would delete the
    generated property its class shares with any copy). A computation used under several names
    (a tied weight, a module registered twice) is done once, so the names share one tensor."""
    from torch.nn.utils import parametrize
    from torch.nn.utils import prune as torch_prune

    plain: dict[str, tuple[str, torch.Tensor] | None] = {}  # state key -> (plain name, value) or dropped
    prefixes: dict[str, tuple[str, torch.Tensor]] = {}  # "x.parametrizations.weight." -> x.weight's
    done: dict[tuple, torch.Tensor] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        if parametrize.is_parametrized(mod):
            for pname, plist in mod.parametrizations.items():
                key = (tuple(id(t) for t in [*plist.parameters(recurse=False), *plist.buffers(recurse=False)]),
                       tuple(id(f) for f in plist))
                if key not in done:
                    with torch.no_grad():
                        done[key] = getattr(mod, pname).detach()
                prefixes[f"{prefix}parametrizations.{pname}."] = (prefix + pname, done[key])
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                name = hook._tensor_name
                plain[f"{prefix}{name}_orig"] = (prefix + name, getattr(mod, name).detach())
                plain[f"{prefix}{name}_mask"] = None
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        base = next((p for p in prefixes if key.startswith(p)), None)
        entry = prefixes[base] if base is not None else plain.get(key, (key, tensor))
        if entry is not None and entry[0] not in out:
            out[entry[0]] = entry[1]
    return out


def _storage(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr()) if t.numel() else ("empty", id(t))


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state with each tied tensor once, {dropped name: kept name}) -- safetensors refuses
    tensors that share memory. Names holding the very same view become aliases (as
    ``safetensors.torch.save_model`` records them); distinct views of one storage are copied."""
    kept: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in state.items():
        v = v.detach()
        ident = (*_storage(v), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if ident in kept:
            aliases[k] = kept[ident]
            continue
        kept[ident] = k
        out[k] = v
    seen: set[tuple] = set()
    for k, v in out.items():
        v = v.cpu().contiguous()
        where = _storage(v)
        out[k] = v.clone() if where in seen else v
        seen.add(where)
    return out, aliases


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the model as it runs (``plain_state_dict``) atomically: .safetensors by extension
    (tied tensors stored once, their other names in the metadata), else torch.save."""
    path = Path(path)
    state = plain_state_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        state, aliases = dedupe(state)
        meta = {**aliases, SAFETENSORS_KEY: tensor_digest(state)}
        return atomic_write(path, lambda p: save_file(state, str(p), metadata=meta))
    state = stamp_state({k: v.detach().cpu().contiguous() for k, v in state.items()})
    return atomic_write(path, lambda p: torch.save(state, p))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, refusing pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"weights file {str(path)!r} is not a valid safetensors file ({exc})") from None
        digest = metadata.pop(SAFETENSORS_KEY, None)
        if digest is not None and tensor_digest(state) != digest:
            raise WeightsError(f"weights file {str(path)!r} is damaged: its tensor data does not match its checksum; re-export it")
        # a tied tensor is stored once; its other names are aliases in the metadata
        # ({dropped: kept}, as safetensors.torch.save_model writes them): restore every name
        for name, kept in metadata.items():
            if name not in state and kept in state:
                state[name] = state[kept]
        return state
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(
            f"weights file {str(path)!r} refused: it holds pickled objects that weights_only=True "
            f"does not allow ({first[:120]}); save a plain state_dict or use .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"weights file {str(path)!r} cannot be read (damaged or not a torch file): {first}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    return check_state(obj, str(path))


def _torch_load(path: Path):
    """torch.load(weights_only=True); a torchao file (int8 tensor subclasses) needs torchao's
    classes on the weights-only allowlist, which importing torchao puts there: retried once."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "torchao." not in str(exc):
            raise
        try:
            import torchao.quantization  # noqa: F401  (registers its safe globals)
        except ImportError:
            raise exc from None
        return torch.load(path, map_location="cpu", weights_only=True)


def check_keys(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str | Path) -> None:
    """WeightsError (one line) when the file's keys are not the model's."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise WeightsError(
            f"weights file {str(path)!r} does not match the model: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict into model; WeightsError naming the first mismatch."""
    state = read_state_dict(path)
    own = model.state_dict()
    check_keys(state, own, path)
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise WeightsError(
                f"weights file {str(path)!r} does not match the model: {k!r} has shape "
                f"{tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
            )
    model.load_state_dict(state)
    return model

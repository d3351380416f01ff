"""Compact storage of sparse weights: ``save_sparse(model, path)`` / ``load_sparse(path, model)``.

Layout (a safetensors file, so loading never unpickles anything):
- header metadata: one key ``"torchslim.sparse"`` = JSON (sorted keys) {"format":
  "torchslim.sparse/2", "tensors": {key: {"enc": ..., "shape": [...]}} per state_dict entry,
  "sha256": export.digest of the stored tensors}. One key only, because safetensors writes
  its metadata map in no fixed order: with one key the file is byte-identical run to run. The
  checksum is verified on load. (Version 1 files, with "format" a metadata key of its own and
  no checksum, still load.)
- ``enc = "dense"``: the tensor as is under ``key``;
- ``enc = "alias"``: a tied name; the tensor is stored once under ``"of"`` and both names load
  as one tensor;
- ``enc = "bitmask"``: ``key::values`` (the non-zeros in row-major order, original dtype) and
  ``key::bitmask`` (uint8, numpy.packbits of the non-zero pattern, big-endian bit order);
- ``enc = "gaps"``: ``key::values`` and ``key::gaps`` (uint8 distance from the previous stored
  position, the first counted from -1); gaps over 255 are bridged by stored explicit zeros, as
  in Deep Compression's relative indexing (Han et al. 2016). The gaps are computed by the
  archive's encoder, ``codec.relative_positions`` (see ``_gaps``).
Each tensor uses whichever of the three is smallest, so dense tensors cost nothing extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import WeightsError
from ..core.utils import atomic_write
from . import codec
from .digest import tensor_digest

FORMAT = "torchslim.sparse/2"
FORMAT_V1 = "torchslim.sparse/1"
MAX_GAP = 255


def _gaps(flat_nz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 steps, stored positions): each step is the distance from the previous stored
    position (1..255); a run of zeros too long for one byte is bridged by stored zeros.

    The gaps themselves come from the archive's encoder, ``codec.relative_positions`` at 8 bits
    (one encoder for both files): its symbol is the number of zeros skipped before a non-zero
    (0..254) or the filler 255 (skip 255 zeros). Here a filler is a stored explicit zero at the
    last position it skips, as in Deep Compression, so every symbol is a step of symbol + 1, a
    filler one of 255, and the stored positions are their running sum."""
    sym = codec.relative_positions(flat_nz, 8)
    steps = np.where(sym == MAX_GAP, MAX_GAP, sym.astype(np.int64) + 1).astype(np.uint8)
    return steps, np.cumsum(steps, dtype=np.int64) - 1


def _encode(key: str, t: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    t = t.detach().cpu().contiguous()
    dense = {key: t}
    if not (t.is_floating_point() and t.numel() > 0):
        return {"enc": "dense", "shape": list(t.shape)}, dense
    flat = t.reshape(-1)
    nz = torch.nonzero(flat).flatten().numpy()
    item = t.element_size()
    sizes = {"dense": t.numel() * item, "bitmask": len(nz) * item + (t.numel() + 7) // 8}
    steps, stored = _gaps(nz)
    sizes["gaps"] = len(stored) * (item + 1)
    enc = min(sizes, key=sizes.get)
    meta = {"enc": enc, "shape": list(t.shape)}
    if enc == "dense":
        return meta, dense
    if enc == "bitmask":
        bits = np.zeros(t.numel(), dtype=bool)
        bits[nz] = True
        return meta, {f"{key}::values": flat[nz].clone(), f"{key}::bitmask": torch.from_numpy(np.packbits(bits))}
    return meta, {f"{key}::values": flat[torch.from_numpy(stored)].clone(), f"{key}::gaps": torch.from_numpy(steps)}


def _decode(key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    shape, enc = meta["shape"], meta["enc"]
    if enc == "alias":  # restored as the same tensor object in load_sparse
        raise KeyError(key)
    if enc == "dense":
        return tensors[key]
    values = tensors[f"{key}::values"]
    numel = int(np.prod(shape)) if shape else 1
    if enc == "bitmask":
        bits = np.unpackbits(tensors[f"{key}::bitmask"].numpy(), count=numel).astype(bool)
        pos = torch.from_numpy(np.flatnonzero(bits))
    elif enc == "gaps":
        pos = torch.cumsum(tensors[f"{key}::gaps"].to(torch.int64), 0) - 1
    else:
        raise WeightsError(f"sparse file: unknown encoding {enc!r} for {key!r}")
    out = torch.zeros(numel, dtype=values.dtype)
    out[pos] = values
    return out.reshape(shape)


def save_sparse(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write model's state_dict with non-zeros stored compactly (atomic write)."""
    from .weights import dedupe

    state = model.state_dict() if isinstance(model, nn.Module) else model
    state, aliases = dedupe(dict(state))  # a tied tensor is stored once (safetensors refuses twins)
    metas, tensors = {}, {}
    for key, t in state.items():
        meta, parts = _encode(key, t)
        metas[key] = meta
        tensors.update(parts)
    for name, kept in aliases.items():
        metas[name] = {"enc": "alias", "of": kept, "shape": metas[kept]["shape"]}
    meta = {"format": FORMAT, "tensors": metas, "sha256": tensor_digest(tensors)}
    header = {"torchslim.sparse": json.dumps(meta, sort_keys=True)}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module | dict[str, torch.Tensor]:
    """The dense state_dict stored at path, or model with it loaded (strict) when given.
    A damaged file (bad header, truncated, checksum mismatch) is a one-line WeightsError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"sparse file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"sparse file {str(path)!r} is damaged or not safetensors ({str(exc)[:120]})") from None
    try:
        if header.get("format") == FORMAT_V1:
            metas, digest = json.loads(header["torchslim.sparse"]), None
        else:
            meta = json.loads(header.get("torchslim.sparse", "{}"))
            if meta.get("format") != FORMAT:
                raise WeightsError(f"{str(path)!r} is not a torchslim sparse file (format {meta.get('format')!r})")
            metas, digest = meta["tensors"], meta["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise WeightsError(f"sparse file {str(path)!r} has a damaged header") from None
    if digest is not None and tensor_digest(tensors) != digest:
        raise WeightsError(f"sparse file {str(path)!r} is damaged: its tensor data does not match its checksum")
    try:
        state = {k: _decode(k, m, tensors) for k, m in metas.items() if m.get("enc") != "alias"}
        state.update({k: state[m["of"]] for k, m in metas.items() if m.get("enc") == "alias"})
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise WeightsError(f"sparse file {str(path)!r} is damaged ({type(exc).__name__})") from None
    if model is None:
        return state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"sparse file {str(path)!r} does not match the model: {str(exc).splitlines()[0]}") from None
    return model

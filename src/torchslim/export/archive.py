"""Compact archive: a model's tensors sparse-encoded, codebook-indexed, bit-packed, entropy-coded.

This is the file Deep Compression ships (Han et al., ICLR 2016 §4–5). It is lossless for the
values it stores: ``load_archive`` gives back bit-identical tensors (zeros come back as +0.0).
Nothing is ever unpickled: the header is JSON, the sections are plain bytes.

File layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"TSLA"
    4       1     format version (1)
    5       1     header coder id (index into codec.CODERS: 0 none, 1 deflate, 2 huffman, 3 lzma, 4 bz2)
    6       4     header length H (uint32)
    10      H     header: UTF-8 JSON, encoded with the header coder
    10+H    ...   sections, back to back, in header order
    end-4   4     CRC32 of every byte before it (detects a flipped byte or a cut tail)

Header JSON: ``{"t": [entry, ...]}``, one entry per state-dict tensor::

    {"n": name, "s": shape, "d": torch dtype, "e": encoding, "vd": stored value dtype,
     "sec": [[role, coder, width, count, nbytes], ...]}

Encodings (the smallest is chosen per tensor):
- ``raw``: the values (section role ``v``) in ``vd`` (float16 when every value is exactly
  representable in float16, else the tensor's own dtype).
- ``sp``: sparse: positions of the non-zeros + their values ``v``.
- ``cb``: codebook (role ``c``, ``vd`` values, at most 256) + positions + one codebook index
  per non-zero (role ``i``) packed to ``width`` bits. Without a positions section every element
  has an index (zero is then a codebook entry).
Positions are a bitmask (role ``m``, 1 bit per element) or Deep Compression's relative indices
(role ``r``: gap before each non-zero in ``width`` bits, the all-ones symbol being a filler that
skips that many zeros; see codec.relative_positions), whichever is smaller.
Sections: ``width`` > 0 means ``count`` unsigned symbols packed MSB-first at that width;
``width`` 0 means ``count`` values of ``vd`` as raw bytes. Each section is then stored with the
coder (none / deflate / huffman / lzma / bz2) that made it smallest.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import WeightsError
from ..core.utils import atomic_write
from . import codec
from .weights import plain_state_dict  # the model as it runs, ties and aliases once

MAGIC = b"TSLA"
VERSION = 1
_PREFIX = struct.Struct("<4sBBI")
_CRC = struct.Struct("<I")
MAX_CODEBOOK = 256


class ArchiveError(WeightsError):
    """The archive cannot be read: not an archive, corrupted, truncated, or not this model's."""


# ---------------------------------------------------------------- public API
def save_archive(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> dict[str, Any]:
    """Write the compact archive of model (or of a state dict) atomically; return its stats
    (bytes, per-tensor sections, and every coder's size per section: what was compared)."""
    state = plain_state_dict(model) if isinstance(model, nn.Module) else dict(model)
    blob, stats = pack(state)
    atomic_write(path, lambda p: p.write_bytes(blob))
    return stats


def load_archive(path: str | Path, model_template: nn.Module | None = None) -> nn.Module | dict[str, torch.Tensor]:
    """The stored state dict, or model_template with it loaded (strict) when one is given."""
    state = unpack(_read(path), str(path))[1]
    if model_template is None:
        return state
    expected = set(model_template.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ArchiveError(
            f"archive {str(path)!r} does not match the model template: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (pass a plain model of the same architecture)"
        )
    try:
        model_template.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArchiveError(f"archive {str(path)!r} does not fit the model template: {str(exc).splitlines()[-1].strip()}") from None
    return model_template


def inspect_archive(path: str | Path) -> dict[str, Any]:
    """A per-tensor table of what the archive holds and where its bytes go (``torchslim inspect``)."""
    blob = _read(path)
    header, state = unpack(blob, str(path))
    rows = []
    for entry in header["t"]:
        t = state[entry["n"]]
        secs = {s[0]: s for s in entry["sec"]}
        positions = "bitmask" if "m" in secs else (f"relative {secs['r'][2]}-bit" if "r" in secs else "dense")
        rows.append({
            "name": entry["n"], "shape": list(t.shape), "dtype": entry["d"], "encoding": entry["e"],
            "numel": t.numel(), "nonzeros": int(torch.count_nonzero(t)), "value_dtype": entry["vd"],
            "codebook": secs["c"][3] if "c" in secs else None,
            "index_bits": secs["i"][2] if "i" in secs else None, "positions": positions,
            "bytes": sum(s[4] for s in entry["sec"]),
            "sections": [dict(zip(("role", "coder", "width", "count", "bytes"), s)) for s in entry["sec"]],
        })
    header_len = _PREFIX.unpack_from(blob)[3]
    return {"path": str(path), "format_version": VERSION, "bytes": len(blob),
            "header_bytes": _PREFIX.size + header_len + _CRC.size, "tensors": rows}


# ---------------------------------------------------------------- container
def pack(state: Mapping[str, torch.Tensor]) -> tuple[bytes, dict[str, Any]]:
    """Archive bytes and stats for a state dict."""
    entries, body, tstats = [], [], []
    for name, tensor in state.items():
        entry, sections = _encode_tensor(name, tensor.detach().cpu())
        entry["sec"] = [[s["role"], s["coder"], s["width"], s["count"], len(s["data"])] for s in sections]
        entries.append(entry)
        body.extend(s["data"] for s in sections)
        tstats.append({"name": name, "encoding": entry["e"], "bytes": sum(len(s["data"]) for s in sections),
                       "sections": [{k: v for k, v in s.items() if k != "data"} for s in sections]})
    header_json = json.dumps({"t": entries}, separators=(",", ":")).encode()
    hcoder, header, _ = codec.best_coding(header_json)
    blob = _PREFIX.pack(MAGIC, VERSION, codec.CODERS.index(hcoder), len(header)) + header + b"".join(body)
    blob += _CRC.pack(zlib.crc32(blob))
    stats = {"bytes": len(blob), "header_bytes": _PREFIX.size + len(header) + _CRC.size,
             "header_coder": hcoder, "tensors": tstats}
    return blob, stats


def unpack(blob: bytes, where: str = "archive") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, state dict) from archive bytes; ArchiveError (one line) on any damage."""
    def fail(msg: str) -> ArchiveError:
        return ArchiveError(f"archive {where!r}: {msg}")

    if len(blob) < _PREFIX.size + _CRC.size:
        raise fail(f"truncated ({len(blob)} bytes is shorter than any archive)")
    magic, version, hcoder, hlen = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise fail("not a torchslim archive (bad magic bytes)")
    if zlib.crc32(blob[:-_CRC.size]) != _CRC.unpack_from(blob, len(blob) - _CRC.size)[0]:
        raise fail("checksum mismatch: the file is corrupted or truncated; re-export it")
    if version != VERSION:
        raise fail(f"format version {version} is not supported (this torchslim reads {VERSION})")
    try:
        start = _PREFIX.size + hlen
        header = json.loads(codec.decode(blob[_PREFIX.size:start], codec.CODERS[hcoder]))
        state, offset = {}, start
        for entry in header["t"]:
            state[entry["n"]], offset = _decode_tensor(entry, blob, offset)
    except ArchiveError:
        raise
    except Exception as exc:  # noqa: BLE001 - a consistent checksum with bad content
        raise fail(f"malformed content ({type(exc).__name__}: {exc})") from None
    if offset != len(blob) - _CRC.size:
        raise fail("section lengths do not add up to the file size")
    return header, state


def _read(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ArchiveError(f"archive {str(p)!r} does not exist")
    return p.read_bytes()


# ---------------------------------------------------------------- per-tensor encoding
def _section(role: str, payload: bytes, width: int, count: int) -> dict[str, Any]:
    coder, data, sizes = codec.best_coding(payload)
    return {"role": role, "coder": coder, "width": width, "count": count, "data": data, "alternatives": sizes}


def _best(options: list[dict[str, Any]]) -> dict[str, Any]:
    return min(options, key=lambda s: len(s["data"]))


def _symbols(role: str, symbols: np.ndarray, widths) -> dict[str, Any]:
    """The smallest of the symbol stream packed at each width, each under every coder."""
    return _best([_section(role, codec.pack_bits(symbols, w), w, len(symbols)) for w in widths])


def _positions(flat_nonzero: np.ndarray, numel: int) -> dict[str, Any]:
    mask = np.zeros(numel, dtype=np.uint8)
    mask[flat_nonzero] = 1
    options = [_section("m", codec.pack_bits(mask, 1), 1, numel)]
    for w in codec.candidate_widths(flat_nonzero):
        sym = codec.relative_positions(flat_nonzero, w)
        options.append(_section("r", codec.pack_bits(sym, w), w, len(sym)))
    return _best(options)


def _value_dtype(t: torch.Tensor) -> torch.dtype:
    """float16 when it stores every value exactly, else the tensor's own dtype."""
    if t.dtype in (torch.float32, torch.float64) and bool((t.to(torch.float16).to(t.dtype) == t).all()):
        return torch.float16
    return t.dtype


def _raw(role: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    data = t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return _section(role, data, 0, t.numel())


def _encode_tensor(name: str, t: torch.Tensor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    entry = {"n": name, "s": list(t.shape), "d": str(t.dtype).removeprefix("torch.")}
    flat = t.reshape(-1)
    vd = _value_dtype(flat)
    candidates = {"raw": (vd, [_raw("v", flat, vd)])}
    if t.is_floating_point() and flat.numel() > 0:
        nz = torch.nonzero(flat).reshape(-1)
        positions = _positions(nz.numpy(), flat.numel()) if len(nz) < flat.numel() else None
        vals = flat[nz]
        if positions is not None:
            candidates["sp"] = (_value_dtype(vals), [positions, _raw("v", vals, _value_dtype(vals))])
        book = torch.unique(vals)
        if 0 < len(book) <= MAX_CODEBOOK:
            cvd = _value_dtype(book)
            idx = torch.searchsorted(book, vals).numpy()
            secs = [_raw("c", book, cvd)] + ([positions] if positions is not None else [])
            secs.append(_symbols("i", idx, sorted({codec.width_for(len(book)), 8})))
            candidates["cb"] = (cvd, secs)
        full = torch.unique(flat)
        if positions is not None and len(full) <= MAX_CODEBOOK:  # zero as a codebook entry
            cvd = _value_dtype(full)
            idx = torch.searchsorted(full, flat).numpy()
            candidates["cb0"] = (cvd, [_raw("c", full, cvd), _symbols("i", idx, sorted({codec.width_for(len(full)), 8}))])
    enc = min(candidates, key=lambda e: sum(len(s["data"]) for s in candidates[e][1]))
    vd, sections = candidates[enc]
    entry["e"], entry["vd"] = ("cb" if enc == "cb0" else enc), str(vd).removeprefix("torch.")
    return entry, sections


def _decode_tensor(entry: dict[str, Any], blob: bytes, offset: int) -> tuple[torch.Tensor, int]:
    dtype, vd = getattr(torch, entry["d"]), getattr(torch, entry["vd"])
    arrays: dict[str, Any] = {}
    for role, coder, width, count, nbytes in entry["sec"]:
        data = codec.decode(blob[offset:offset + nbytes], coder)
        offset += nbytes
        if width:
            arrays[role] = codec.unpack_bits(data, width, count)
            arrays[role + "w"] = width
        else:
            arrays[role] = torch.frombuffer(bytearray(data), dtype=vd) if count else torch.empty(0, dtype=vd)
            if arrays[role].numel() != count:
                raise ValueError(f"section {role} of {entry['n']} holds {arrays[role].numel()} values, expected {count}")
    numel = int(np.prod(entry["s"], dtype=np.int64))
    if entry["e"] == "raw":
        return arrays["v"].to(dtype).reshape(entry["s"]), offset
    values = arrays["c"][torch.from_numpy(arrays["i"].astype(np.int64))] if entry["e"] == "cb" else arrays["v"]
    if "m" in arrays:
        pos = torch.from_numpy(np.flatnonzero(arrays["m"]))
    elif "r" in arrays:
        pos = torch.from_numpy(codec.positions_from_relative(arrays["r"], arrays["rw"]))
    else:
        return values.to(dtype).reshape(entry["s"]), offset
    out = torch.zeros(numel, dtype=dtype)
    out[pos] = values.to(dtype)
    return out.reshape(entry["s"]), offset

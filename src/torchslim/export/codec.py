"""Byte-level building blocks of the compact archive: bit packing, sparse positions, coders.

Entropy coding uses libraries, never a hand-written coder:
- ``huffman``: raw DEFLATE with ``zlib.Z_HUFFMAN_ONLY`` — no LZ77 matching, only zlib's
  canonical Huffman code over byte symbols. On byte-per-symbol streams (codebook indices,
  relative positions) this is exactly the Huffman stage of Deep Compression.
- ``deflate`` (zlib, LZ77 + Huffman), ``lzma`` (raw LZMA2, no container) and ``bz2``: the stdlib's
  general compressors. ``none`` stores the bytes as they are.
The archive tries them all per section and keeps the smallest (``best_coding``).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Iterable

import numpy as np

CODERS = ("none", "deflate", "huffman", "lzma", "bz2")
# a 1 MiB dictionary: preset 9's default 64 MiB costs ~700 MiB of encoder memory per call
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]
_BIG = 1 << 22  # above 4 MiB, skip the slow extreme-preset LZMA


def _deflate(data: bytes, strategy: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9, strategy)
    return comp.compress(data) + comp.flush()


def encode(data: bytes, coder: str) -> bytes:
    if coder == "none":
        return data
    if coder == "deflate":
        return _deflate(data, zlib.Z_DEFAULT_STRATEGY)
    if coder == "huffman":
        return _deflate(data, zlib.Z_HUFFMAN_ONLY)
    if coder == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if coder == "bz2":
        return bz2.compress(data, 9)
    raise ValueError(f"unknown coder {coder!r}")


def decode(data: bytes, coder: str) -> bytes:
    if coder == "none":
        return data
    if coder in ("deflate", "huffman"):
        return zlib.decompress(data, -15)
    if coder == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if coder == "bz2":
        return bz2.decompress(data)
    raise ValueError(f"unknown coder {coder!r}")


def all_codings(data: bytes) -> dict[str, bytes]:
    """The data under every coder (lzma skipped for very large sections: too slow)."""
    return {c: encode(data, c) for c in CODERS if not (c == "lzma" and len(data) > _BIG)}


def best_coding(data: bytes) -> tuple[str, bytes, dict[str, int]]:
    """(coder, encoded bytes, {coder: size}) with the smallest encoding; 'none' wins ties."""
    options = all_codings(data)
    coder = min(options, key=lambda c: (len(options[c]), CODERS.index(c)))
    return coder, options[coder], {c: len(v) for c, v in options.items()}


# ---------------------------------------------------------------- bit packing
def pack_bits(symbols: np.ndarray, width: int) -> bytes:
    """Pack unsigned symbols (< 2**width, width 1..8) MSB-first, width bits each."""
    sym = np.asarray(symbols, dtype=np.uint8)
    if width == 8:
        return sym.tobytes()
    bits = np.unpackbits(sym[:, None], axis=1)[:, 8 - width:]
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: ``count`` symbols of ``width`` bits as uint8."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == 8:
        return raw[:count].copy()
    bits = np.unpackbits(raw)[: count * width].reshape(count, width)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - width:] = bits
    return np.packbits(full, axis=1).reshape(-1)


def width_for(k: int) -> int:
    """Bits needed for symbols 0..k-1 (at least 1)."""
    return max(1, int(k - 1).bit_length())


# ---------------------------------------------------------------- sparse positions
def relative_positions(positions: np.ndarray, width: int) -> np.ndarray:
    """Deep Compression's relative indices: the gap (zeros skipped) before each non-zero,
    in ``width`` bits. A gap too long for the width is split with fillers: the symbol
    M = 2**width - 1 means "skip M zeros, no value here" (so fillers cost an index but, unlike
    the paper's filler zero, no stored weight)."""
    m = (1 << width) - 1
    pos = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    fillers = gaps // m
    out = np.full(int(fillers.sum()) + len(gaps), m, dtype=np.uint8)
    ends = np.cumsum(fillers + 1) - 1  # slot of each real gap, after its fillers
    out[ends] = (gaps % m).astype(np.uint8)
    return out


def positions_from_relative(symbols: np.ndarray, width: int) -> np.ndarray:
    """Inverse of relative_positions: the flat indices of the non-zeros."""
    m = (1 << width) - 1
    sym = np.asarray(symbols, dtype=np.int64)
    filler = sym == m
    steps = np.where(filler, m, sym + 1)
    return (np.cumsum(steps) - 1)[~filler]


def relative_count(positions: np.ndarray, width: int) -> int:
    """Number of symbols relative_positions would emit (cheap: for choosing the width)."""
    m = (1 << width) - 1
    gaps = np.diff(np.concatenate([[-1], np.asarray(positions, dtype=np.int64)])) - 1
    return int((gaps // m).sum()) + len(gaps)


def candidate_widths(positions: np.ndarray, keep: int = 2) -> Iterable[int]:
    """The ``keep`` widths with the smallest packed size, plus 8 (byte symbols for Huffman)."""
    sizes = {w: relative_count(positions, w) * w for w in range(1, 9)}
    best = sorted(sizes, key=sizes.get)[:keep]
    return sorted(set(best) | {8})

"""One sparse-position encoder for both writers (issue 11, item 6).

``codec.relative_positions`` is the only code that turns non-zero positions into gap symbols:
the archive stores its symbols as they are (a filler skips zeros, no value), the sparse
safetensors file stores them as steps from the previous stored position (a filler is a stored
zero, as in Han et al. 2016), derived from the same symbols in ``sparse._gaps``. Files written
before the merge must not change by one byte."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from torchslim.export import codec
from torchslim.export.archive import load_archive, pack, save_archive
from torchslim.export.sparse import MAX_GAP, _gaps, load_sparse, save_sparse

DENSITIES = (0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 0.999, 1.0)


def _mask(n: int, density: float, seed: int) -> np.ndarray:
    # numpy's PCG64 Generator gives the same stream on every CPU and OS
    return np.random.default_rng(seed).random(n) < density


@pytest.mark.parametrize("density", DENSITIES)
def test_merged_encoder_round_trips_random_masks(density):
    for seed, n in ((0, 1), (1, 257), (2, 5000)):
        mask = _mask(n, density, seed)
        pos = np.flatnonzero(mask)
        for width in range(1, 9):  # the archive's form, every width it may choose
            sym = codec.relative_positions(pos, width)
            assert sym.dtype == np.uint8 and int(sym.max(initial=0)) < 2**width
            assert np.array_equal(codec.positions_from_relative(sym, width), pos)
            assert len(sym) == codec.relative_count(pos, width)
            packed = codec.pack_bits(sym, width)
            assert np.array_equal(codec.positions_from_relative(codec.unpack_bits(packed, width, len(sym)), width), pos)
        steps, stored = _gaps(pos)  # the sparse file's form of the same symbols
        assert steps.dtype == np.uint8 and (len(steps) == 0 or steps.min() >= 1)
        assert np.array_equal(np.cumsum(steps.astype(np.int64)) - 1, stored)  # what load_sparse reads
        assert np.array_equal(stored[mask[stored]], pos)  # every non-zero stored, in order
        fillers = int(((np.diff(np.r_[-1, pos]) - 1) // MAX_GAP).sum())  # one stored zero per 255 skipped
        assert len(stored) == len(pos) + fillers


@pytest.mark.parametrize("density", DENSITIES)
def test_both_writers_round_trip_random_masks(tmp_path, density):
    gen = torch.Generator().manual_seed(7)
    mask = torch.from_numpy(_mask(3000, density, 3))
    t = (torch.randn(3000, generator=gen) + 3.0) * mask  # values never exactly zero
    state = {"w": t.reshape(30, 100), "b": torch.from_numpy(_mask(40, density, 4)).float() * 2.5}
    back = load_sparse(save_sparse(state, tmp_path / "s.safetensors"))
    save_archive(state, tmp_path / "a.tsla")
    arch = load_archive(tmp_path / "a.tsla")
    for k, v in state.items():
        assert torch.equal(back[k], v) and torch.equal(arch[k], v), k


def fixed_state() -> dict[str, torch.Tensor]:
    """Tensors whose positions exercise every branch of both encoders: long gaps (fillers at
    exactly 255 and 256 zeros, a gap of 254), ~9% density (sparse file: gaps), ~60% density
    (bitmask), all-zero and all-one masks. Built from integer arithmetic only."""
    i = np.arange(4096)
    sparse9 = ((i * 2654435761) % 97) < 9
    dense60 = ((i * 40503) % 10) < 6
    values = ((i % 13) - 6) * 0.25
    values[values == 0] = 0.5  # exactly representable, never zero
    gaps = np.zeros(3000, dtype=bool)
    gaps[[0, 255, 511, 766, 1021, 1277, 2000, 2999]] = True  # zero runs 0, 254, 255, 254, 254, 255, 722, 998
    out = {}
    for name, mask in (("sparse9", sparse9), ("dense60", dense60), ("gaps", gaps),
                       ("none", np.zeros(500, bool)), ("all", np.ones(300, bool))):
        out[name] = torch.from_numpy((values[: len(mask)] * mask).astype(np.float32))
    return out


# sha256 of the bytes each writer produced for fixed_state() BEFORE the two encoders were merged
# (sparse.py had its own _gaps loop then; computed with that code, safetensors 0.8.0, and pasted
# here): the merge must change no byte of a file, so files written earlier load as before.
OLD_SPARSE_SHA256 = "dc213e94681e690f5efaf879b841280e791f8031c40ee727c0937e5faedcff27"
# the archive with its entropy coders replaced by "none": deflate / lzma / bz2 output is the
# business of the zlib / liblzma / libbz2 on the machine (zlib-ng builds differ), not of torchslim;
# what this pins is the archive's own layout, sections and position symbols
OLD_ARCHIVE_SHA256 = "90def116435120aae6c000ca8de819afe9997f9383bde897878a59a8252d0c13"


def test_sparse_writer_bytes_unchanged(tmp_path):
    path = save_sparse(fixed_state(), tmp_path / "fixed.safetensors")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == OLD_SPARSE_SHA256
    from safetensors.torch import load_file

    raw = load_file(str(path))  # the fixture reaches the encodings it is meant to
    assert {"sparse9::gaps", "gaps::gaps", "dense60::bitmask", "all"} <= set(raw)


def test_archive_writer_bytes_unchanged(monkeypatch):
    monkeypatch.setattr(codec, "all_codings", lambda data: {"none": data})
    blob, stats = pack(fixed_state())
    assert hashlib.sha256(blob).hexdigest() == OLD_ARCHIVE_SHA256
    roles = {t["name"]: {s["role"] for s in t["sections"]} for t in stats["tensors"]}
    assert "r" in roles["gaps"] and "m" in roles["dense60"]  # relative indices and a bitmask

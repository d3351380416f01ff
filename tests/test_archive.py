"""Compact archive: lossless round trip, Deep Compression encodings, damage detection, real size."""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.export import codec
from torchslim.export.archive import (
    ArchiveError,
    inspect_archive,
    load_archive,
    pack,
    save_archive,
    unpack,
)
from torchslim.sharing import ShareConfig, apply
from torchslim.zoo import build_model


def pruned_shared_lenet(keep: float = 0.1, bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet300", None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                w.mul_(w.abs() > w.abs().flatten().kthvalue(int(w.numel() * (1 - keep))).values)
    apply(model, ShareConfig(bits=bits, fp16_floats=True), None)
    return model


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    model = pruned_shared_lenet()
    path = tmp_path_factory.mktemp("arc") / "model.tsla"
    stats = save_archive(model, path)
    return model, path, stats


def test_round_trip_is_bit_exact(shared):
    model, path, _ = shared
    loaded = load_archive(path, build_model("lenet300", None))
    x = torch.rand(32, 64)
    assert torch.equal(loaded(x), model(x))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert torch.equal(loaded.get_submodule(name).weight, m.weight.detach())


def test_archive_is_much_smaller_than_state_dict(shared):
    model, path, stats = shared
    buf = io.BytesIO()
    torch.save(build_model("lenet300", None).state_dict(), buf)
    ratio = len(buf.getvalue()) / path.stat().st_size
    # 10% kept, 4-bit indices: about 5,000 weights at <= 4 + ~5 (positions) bits each, plus
    # 410 fp16 biases, is ~6.5 KB against ~205 KB of fp32: expect > 25x.
    assert stats["bytes"] == path.stat().st_size
    assert ratio > 25, ratio
    table = inspect_archive(path)
    weights = [t for t in table["tensors"] if t["name"].endswith("weight")]
    assert all(t["encoding"] == "cb" and t["index_bits"] <= 8 and t["codebook"] <= 16 for t in weights)
    assert sum(t["nonzeros"] for t in weights) == sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    assert all(t["value_dtype"] == "float16" for t in table["tensors"])


def test_flipped_byte_and_truncation_give_one_line_error(shared, tmp_path):
    _, path, _ = shared
    blob = path.read_bytes()
    for where in (0, 7, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[where] ^= 0x10
        (tmp_path / "bad.tsla").write_bytes(bytes(bad))
        with pytest.raises(ArchiveError) as err:
            load_archive(tmp_path / "bad.tsla")
        assert "\n" not in str(err.value) and isinstance(err.value, TorchslimError)
    for cut in (1, 100, len(blob) - 3):
        (tmp_path / "cut.tsla").write_bytes(blob[:-cut])
        with pytest.raises(ArchiveError, match="corrupted or truncated|truncated"):
            load_archive(tmp_path / "cut.tsla")
    with pytest.raises(ArchiveError, match="does not exist"):
        load_archive(tmp_path / "missing.tsla")


def test_template_mismatch_is_a_clear_error(shared):
    _, path, _ = shared
    with pytest.raises(ArchiveError, match="does not match the model template"):
        load_archive(path, build_model("lenet5", None))
    with pytest.raises(ArchiveError, match="does not fit the model template"):
        load_archive(path, build_model("lenet300", None, num_classes=3))


def test_every_kind_of_tensor_round_trips():
    torch.manual_seed(1)
    sparse = torch.randn(40, 30) * (torch.rand(40, 30) > 0.9)
    state = {
        "dense": torch.randn(17, 5),                      # raw fp32
        "halfable": torch.randn(9).half().float(),        # raw fp16, exact
        "sparse": sparse,                                  # sp: positions + values
        "few": torch.tensor([0.5, -2.0, 0.0, 0.5] * 50).reshape(10, 20),  # codebook
        "zeros": torch.zeros(3, 3), "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.25),
        "steps": torch.tensor(12345, dtype=torch.int64), "flags": torch.tensor([True, False, True]),
        "bf16": torch.randn(6).bfloat16(), "double": torch.randn(4, dtype=torch.float64),
    }
    blob, stats = pack(state)
    _, back = unpack(blob)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    enc = {t["name"]: t["encoding"] for t in stats["tensors"]}
    assert enc["dense"] == "raw" and enc["sparse"] == "sp" and enc["few"] == "cb"


def test_torch_prune_reparametrization_is_stored_as_plain_weight(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.8)
    save_archive(model, tmp_path / "p.tsla")
    plain = load_archive(tmp_path / "p.tsla", nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3)))
    x = torch.randn(4, 20)
    assert torch.equal(plain(x), model(x)) and int((plain[0].weight == 0).sum()) == 160


def test_relative_indices_match_deep_compression_example():
    # Han et al. Fig. 2 style, 3-bit gaps (M = 7): non-zeros at 1, 4, 20 -> gaps 1, 2, 15 = 7 + 7 + 1
    sym = codec.relative_positions(np.array([1, 4, 20]), 3)
    assert sym.tolist() == [1, 2, 7, 7, 1]
    assert codec.positions_from_relative(sym, 3).tolist() == [1, 4, 20]
    assert codec.relative_count(np.array([1, 4, 20]), 3) == 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=200, unique=True), st.integers(1, 8))
def test_relative_positions_and_bit_packing_round_trip(positions, width):
    pos = np.array(sorted(positions), dtype=np.int64)
    sym = codec.relative_positions(pos, width)
    assert len(sym) == codec.relative_count(pos, width) and (sym < 2**width).all()
    packed = codec.pack_bits(sym, width)
    assert len(packed) == math.ceil(len(sym) * width / 8)
    assert codec.positions_from_relative(codec.unpack_bits(packed, width, len(sym)), width).tolist() == pos.tolist()


def test_huffman_coder_is_within_a_bit_of_entropy():
    # a skewed 16-symbol source: a Huffman code lies in [H, H + 1) bits per symbol (plus a table)
    rng = np.random.default_rng(0)
    probs = 0.5 ** np.arange(1, 17)
    probs /= probs.sum()
    data = rng.choice(16, size=20000, p=probs).astype(np.uint8)
    counts = np.array(list(Counter(data.tolist()).values()), dtype=float)
    entropy_bytes = -(counts * np.log2(counts / counts.sum())).sum() / 8
    coded = codec.encode(data.tobytes(), "huffman")
    assert entropy_bytes <= len(coded) <= entropy_bytes + len(data) / 8 * 0.1 + 64
    assert codec.decode(coded, "huffman") == data.tobytes()
    _, best, sizes = codec.best_coding(data.tobytes())
    assert len(best) == min(sizes.values()) and set(sizes) == set(codec.CODERS)

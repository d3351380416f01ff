"""Tied weights and aliased modules (issue 10): weight sharing, low-rank, plain weight files.

Two shapes of sharing: one nn.Parameter used by two nn.Linear (``Tied``), and one nn.Linear
registered under two attribute names (``Alias``). Every technique must keep the sharing (or
say why not), and every file must load back into the plain model with ``load_state_dict``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.measure.latency import count_macs
from torchslim.export.weights import load_weights, read_state_dict, save_weights
from torchslim.lowrank import LowRankConfig, factorize_layers
from torchslim.sharing import ShareConfig, shared_layers
from torchslim.sharing import apply as share
from torchslim.zoo import build_model


class Tied(nn.Module):
    """a and b are two Linears holding one weight Parameter (their biases are their own)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Alias(nn.Module):
    """One Linear reachable as both a and b, called twice."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.a, self.c = nn.Linear(width, width), nn.Linear(width, 4)
        self.b = self.a

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def make(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


X = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- 1. weight sharing
@pytest.mark.parametrize("cls", [Tied, Alias])
def test_share_keeps_the_tie_and_runs(cls):
    model = make(cls)
    w0 = model.a.weight.detach().clone()
    info = share(model, ShareConfig(bits=2)).info
    model(X)  # crashed: the tied Parameter was emptied to shape (0,)
    assert torch.equal(model.a.weight, model.b.weight)
    assert len(torch.unique(model.a.weight)) <= 4
    # one codebook for the tied weight, trained once
    books = {id(p.codebook) for p in shared_layers(model).values()}
    assert len(books) == 2  # the tied weight's and c's
    assert info["layers"]["a"]["tied"] == ["a", "b"]
    assert not torch.equal(model.a.weight, w0)  # really shared (4 values)


def test_share_tied_when_only_one_user_is_selected():
    model = make(Tied)
    info = share(model, ShareConfig(bits=2, layers=("a",))).info
    model(X)
    assert torch.equal(model.a.weight, model.b.weight) and len(torch.unique(model.b.weight)) <= 4
    assert info["layers"]["a"]["tied"] == ["a", "b"]


def test_share_refuses_two_bit_widths_for_one_tied_weight_before_work():
    model = make(Tied)
    with pytest.raises(TorchslimError, match=r"'a'.*'b'") as err:
        share(model, ShareConfig(bits={"a": 2, "b": 3, "c": 2}))
    assert "\n" not in str(err.value)
    assert not torch.nn.utils.parametrize.is_parametrized(model.c)  # nothing was done


def test_share_names_recurrent_and_attention_layers_it_skips():
    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.attn, self.head = nn.GRU(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            y, _ = self.gru(x)
            y, _ = self.attn(y, y, y)
            return self.head(y)

    model = make(Rec)
    with pytest.warns(UserWarning, match=r"weight sharing skipped.*gru \(GRU.*attn \(MultiheadAttention") as rec:
        share(model, ShareConfig(bits=2))
    assert len([w for w in rec if "skipped" in str(w.message)]) == 1
    model(torch.randn(3, 2, 8))


# ---------------------------------------------------------------- 2. tied tensors in files
@pytest.mark.parametrize("cls", [Tied, Alias])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_model_saves_once_and_loads_back_tied(tmp_path, cls, suffix):
    model = make(cls)
    path = save_weights(model, tmp_path / f"w{suffix}")  # safetensors: "Some tensors share memory"
    fresh = load_weights(make(cls, seed=5), path)
    assert fresh.b.weight is fresh.a.weight or cls is Alias and fresh.b is fresh.a
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())
    make(cls, seed=6).load_state_dict(state)  # plain load_state_dict, strict
    if suffix == ".safetensors":
        raw = safetensors.torch.load_file(str(path))
        assert "b.weight" not in raw  # stored once, the alias recorded in the metadata
        other = make(cls, seed=7)
        safetensors.torch.load_model(other, str(path))  # the safetensors way reads it too
        assert torch.equal(other.b.weight, model.a.weight)


# ---------------------------------------------------------------- 3. low-rank
@pytest.mark.parametrize("cls", [Tied, Alias])
def test_lowrank_factorizes_a_tied_weight_once_and_macs_agree_with_measure(cls):
    model = make(cls)
    w = model.a.weight.detach().double()
    recs = factorize_layers(model, LowRankConfig(min_saved_macs=0, rank=3, min_mac_saving=0.0), X[:1])
    model(X)
    a, b = model.a, model.b
    assert isinstance(a, nn.Sequential) and isinstance(b, nn.Sequential)
    assert a[0].weight is b[0].weight and a[1].weight is b[1].weight  # still one weight
    u, s, vh = torch.linalg.svd(w)
    w3 = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose((a[1].weight @ a[0].weight).double(), w3, atol=1e-5)
    # the stage's MACs claim (every MAC-bearing layer was considered) equals measure's count
    assert sum(r["macs_after"] for r in recs) == count_macs(model, X[:1])
    names = [r["layer"] for r in recs]
    assert set(names) == {"a", "b", "c"} if cls is Tied else set(names) == {"a", "c"}


def test_lowrank_skips_a_weight_tied_to_a_non_factorizable_module():
    class Lm(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(30, 16), nn.Linear(16, 16), nn.Linear(16, 30, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.mid(self.emb(x))))

    model = make(Lm)
    with pytest.warns(UserWarning, match=r"head \(weight tied with emb") as rec:
        recs = factorize_layers(model, LowRankConfig(min_saved_macs=0, rank=2), torch.zeros(1, 3, dtype=torch.long))
    assert len([w for w in rec if "skipped" in str(w.message)]) == 1
    assert model.head.weight is model.emb.weight and [r["layer"] for r in recs] == ["mid"]


def test_lowrank_skips_attention_out_proj_and_recurrent_layers_in_one_warning():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.lstm = nn.MultiheadAttention(16, 2), nn.LSTM(16, 16)
            self.gru, self.head = nn.GRU(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            y, _ = self.attn(x, x, x)
            y, _ = self.lstm(y)
            y, _ = self.gru(y)
            return self.head(y)

    model = make(Mixed)
    x = torch.randn(3, 2, 16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        recs = factorize_layers(model, LowRankConfig(min_saved_macs=0, rank=2), x)
    msgs = [str(w.message) for w in rec if "skipped" in str(w.message)]
    assert len(msgs) == 1, msgs
    for name in ("attn.out_proj", "attn (", "lstm (LSTM", "gru (GRU"):
        assert name in msgs[0], (name, msgs[0])
    assert isinstance(model.attn.out_proj, nn.Linear) and [r["layer"] for r in recs] == ["head"]
    model(x)  # out_proj replaced by a Sequential broke MHA's forward


# ---------------------------------------------------------------- 4. plain artifacts
def test_saved_shared_model_is_the_model_as_it_runs(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300")
    share(model, ShareConfig(bits=3))
    path = save_weights(model, tmp_path / "model.safetensors")
    state = read_state_dict(path)
    assert not any("parametrizations" in k for k in state), sorted(state)[:4]
    plain = build_model("lenet300")
    plain.load_state_dict(state)  # strict: plain names, materialized weights
    load_weights(build_model("lenet300"), path)  # what `torchslim measure --weights` does
    x = torch.randn(4, *plain_in_shape(plain))
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    model(x)  # the original stays parametrized and runs
    assert shared_layers(model)


def test_saved_shared_tied_model_keeps_one_copy(tmp_path):
    model = make(Tied)
    share(model, ShareConfig(bits=2))
    path = save_weights(model, tmp_path / "w.safetensors")
    fresh = load_weights(make(Tied, seed=3), path)
    assert torch.allclose(fresh(X), model(X), atol=1e-6) and fresh.b.weight is fresh.a.weight


def plain_in_shape(model: nn.Module) -> tuple[int, ...]:
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return (first.in_features,)


def test_export_safetensors_of_an_onnxruntime_model_is_refused(tmp_path):
    from torchslim.app.runner import _export

    class FakeOrt(nn.Module):
        onnx_bytes = b"\x08\x07"

    recipe = SimpleNamespace(spec=SimpleNamespace(export=["safetensors"]))
    with pytest.raises(TorchslimError, match="onnx") as err:
        _export(FakeOrt(), None, recipe, tmp_path, lambda s: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "model.safetensors").exists()


def test_lowrank_after_sharing_is_not_mistaken_for_a_tie():
    model = make(Tied)
    share(model, ShareConfig(bits=2, layers=("c",)))  # c's weight is computed on every access
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = factorize_layers(model, LowRankConfig(min_saved_macs=0, rank=2), X[:1])
    assert {r["layer"] for r in recs} == {"a", "b", "c"} and isinstance(model.c, nn.Sequential)


def tied_digits() -> nn.Module:
    """A tied model for the digits task (64 features, 10 classes), for recipes."""
    torch.manual_seed(0)
    model = Tied(64)
    model.c = nn.Linear(64, 10)
    return model


@pytest.mark.slow
def test_run_a_recipe_on_a_tied_model(tmp_path):
    from torchslim.app.runner import run_recipe

    recipe = {"name": "tied", "task": {"name": "digits", "kwargs": {"batch_size": 32}},
              "model": "test_ties:tied_digits", "seed": 0,
              "stages": [{"lowrank": {"params_keep": 0.5, "min_saved_macs": 0}}, {"share": {"bits": 4}}],
              "export": ["safetensors"], "measure": {"batch_size": 1, "repeats": 2}}
    summary = run_recipe(recipe, out=tmp_path, log=lambda m: None, trust_code=True)  # died at baseline
    low = summary["rows"][1]
    assert low["macs_per_sample"] == low["info"]["macs_after"]  # the stage's claim is measure's count
    state = read_state_dict(tmp_path / "model.safetensors")
    assert not any("parametrizations" in k for k in state)
    assert torch.equal(state["a.0.weight"], state["b.0.weight"])


@pytest.mark.parametrize("cls", [Tied, Alias])
def test_archive_of_a_shared_tied_or_aliased_model_loads_back(tmp_path, cls):
    """The archive holds the model as it runs under plain names (an aliased module's weights
    used to stay under parametrization keys, and load_archive refused the file)."""
    from torchslim.export.archive import load_archive, save_archive

    model = make(cls)
    share(model, ShareConfig(bits=2))
    save_archive(model, tmp_path / "m.tsla")
    back = load_archive(tmp_path / "m.tsla", make(cls, seed=5))
    assert torch.equal(back(X), model(X))

"""The bundled MiniLM: offline load, equality with sentence-transformers, the fidelity task."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the point under test: everything works with no network

import math
import re
import socket

import pytest
import torch

from torchslim.core.errors import ConfigError, TaskError
from torchslim.zoo import build_model, build_task
from torchslim.zoo import minilm as M

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh target cache, so the test really computes (and then reuses) the fp32 targets."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TORCHSLIM_CACHE")
    os.environ["TORCHSLIM_CACHE"] = str(path)
    M._REFERENCE_MEMO.clear()
    yield path
    M._REFERENCE_MEMO.clear()
    if old is None:
        os.environ.pop("TORCHSLIM_CACHE", None)
    else:
        os.environ["TORCHSLIM_CACHE"] = old


@pytest.fixture(scope="module")
def model():
    """Load with every socket connection refused: proves the load needs no network."""
    def refuse(*a, **k):
        raise OSError("network disabled by test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        m = build_model("minilm")
        M.load_tokenizer()
    return m


@pytest.fixture(scope="module")
def full_task(cache, model):
    return build_task("minilm", n_sentences=512, calib_sentences=0, val_sentences=0)


@pytest.fixture(scope="module")
def small_task(cache, model):
    return build_task("minilm", n_sentences=32, calib_sentences=16, val_sentences=16, batch_size=16)


def test_loads_offline_as_fp32_eval(model):
    # offline is proven by the fixture: it loads with every socket connection refused
    assert isinstance(model, M.SentenceEncoder) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # .bert exposes the Linear layers and heads for pruning/quantization: 6 layers x 6 Linears
    assert sum(isinstance(m, torch.nn.Linear) for m in model.bert.modules()) == 6 * 6  # no pooler
    h, f = 384, 1536  # embeddings (+ LayerNorm), then per layer Q/K/V/O, FFN in/out, 2 LayerNorms
    hand = (30522 + 512 + 2) * h + 2 * h + 6 * (4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h)
    assert sum(p.numel() for p in model.parameters()) == hand == 22_565_376
    assert model.bert.config.num_attention_heads == 12
    assert model.bert.config.hidden_dropout_prob == 0.0  # train mode reproduces the targets


def test_matches_sentence_transformers(model):
    st = pytest.importorskip("sentence_transformers")
    texts = ["Hi.", "Return the number of items in a container.", "A longer sentence " * 8 + "end.",
             "Deep copy operation on arbitrary Python objects."]
    ref = st.SentenceTransformer(str(M.model_dir()), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_tensor=True)
    ours = M.encode(model, M.load_tokenizer(), texts, batch_size=4, max_length=256)  # ST's max
    assert ours.shape == (4, 384)
    assert (ours - ref.cpu()).abs().max().item() < 1e-5
    assert torch.allclose(ours.norm(dim=1), torch.ones(4), atol=1e-6)


def test_full_task_has_500_distinct_real_english_sentences(full_task):
    texts = M.sentences(512)
    assert len(set(texts)) == 512
    inputs = [b[0] for b in full_task.test]
    assert sum(x["input_ids"].shape[0] for x in inputs) == 512
    function_words = {"the", "a", "an", "of", "to", "is", "and", "for", "in", "if", "this", "or"}
    has_fw = sum(bool(function_words & set(re.findall(r"[a-z]+", t.lower()))) for t in texts)
    assert has_fw / 512 > 0.8
    assert all(t[0].isupper() and t.endswith(".") and len(t.split()) >= 4 for t in texts)
    unk = M.load_tokenizer().unk_token_id
    ids = torch.cat([x["input_ids"].flatten() for x in inputs])
    assert (ids == unk).float().mean().item() < 0.001
    # padding is small (length-sorted, token-budgeted batches): measured 8.7% of positions
    pads = sum((x["attention_mask"] == 0).sum().item() for x in inputs)
    assert pads / sum(x["attention_mask"].numel() for x in inputs) < 0.15
    first = inputs[0]["attention_mask"].sum(1).float()  # example_inputs(): a typical batch
    lengths = torch.cat([x["attention_mask"].sum(1) for x in inputs]).float()
    assert first.min() <= lengths.median() <= first.max()


def test_fp32_model_scores_one_on_itself(full_task, model):
    scores = full_task.evaluate_all(model)
    assert full_task.metric_name == "mean_cosine"
    assert scores["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert scores["top10_agreement"] == pytest.approx(1.0, abs=1e-5)


def test_perturbed_model_scores_below_one(small_task, model):
    # noise (std 0.02, ~the weights' own scale/2) on one Linear: measured cos 0.984, top-10 0.92
    weight = model.bert.encoder.layer[0].output.dense.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            weight.add_(torch.randn(weight.shape, generator=gen) * 0.02)
        scores = small_task.evaluate_all(model)
        outputs, targets = small_task.outputs_and_targets(model, "train")
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert 0.9 < scores["mean_cosine"] < 0.999
    assert scores["top10_agreement"] < 0.99
    loss = small_task.loss(outputs, targets).item()
    assert loss == pytest.approx(1 - M.mean_cosine(outputs, targets), abs=1e-6) and loss > 1e-3


def test_splits_disjoint_and_targets_cached(small_task, cache):
    texts = M.sentences(64)
    assert texts == M.sentences(70)[:64] and M.sentences(5, offset=3) == texts[3:8]
    rows = {s: _token_rows(small_task.split(s)) for s in ("test", "train", "val")}
    assert {s: len(r) for s, r in rows.items()} == {"test": 32, "train": 16, "val": 16}
    assert len(rows["test"] | rows["train"] | rows["val"]) == 64  # disjoint
    files = list((cache / "minilm").glob("targets-*.pt"))
    assert len(files) >= 3
    # a second build reads the disk cache (memory cache cleared): the model must not be loaded
    M._REFERENCE_MEMO.clear()

    def boom():
        raise AssertionError("reference model loaded despite the cache")

    got = M.reference_embeddings(texts[32:48], 16, 128, reference=boom)
    want = torch.cat([t for _, t in small_task.train])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def _token_rows(loader):
    """Each sentence as its unpadded token ids (distinct sentences give distinct rows)."""
    return {tuple(ids[mask.bool()].tolist()) for x, _ in loader
            for ids, mask in zip(x["input_ids"], x["attention_mask"])}


def test_cosine_metric_closed_form():
    theta = torch.linspace(0, math.pi / 2, 7)
    out = torch.zeros(7, 384)
    out[:, 0], out[:, 1] = theta.cos() * 5, theta.sin() * 5  # scale must not matter
    tgt = torch.zeros(7, 384)
    tgt[:, 0] = 1.0
    assert M.mean_cosine(out, tgt) == pytest.approx(theta.cos().mean().item(), abs=1e-6)
    assert M.cosine_loss(out, tgt).item() == pytest.approx(1 - theta.cos().mean().item(), abs=1e-6)


def test_top10_agreement_closed_form():
    # 40 points on a circle: the top-10 neighbours of i are i±1..±5. Moving point i to the angle
    # of 3i (mod 40) makes its neighbours i±1, ±12, ±13, ±14, ±15 (3^-1 = 27 mod 40): only ±1
    # survive, so agreement = 2/10; cosines are cos(2π·2i/40), which average to exactly 0.
    n = 40

    def circle(pos):
        e = torch.zeros(n, 384, dtype=torch.float64)
        ang = 2 * math.pi * pos / n
        e[:, 0], e[:, 1] = ang.cos(), ang.sin()
        return e

    i = torch.arange(n, dtype=torch.float64)
    ref, moved = circle(i), circle((3 * i) % n)
    assert M.top10_agreement(ref, ref) == 1.0
    assert M.top10_agreement(moved, ref) == pytest.approx(0.2, abs=1e-6)
    assert M.mean_cosine(moved, ref) == pytest.approx(0.0, abs=1e-6)
    assert M.top_k_agreement(ref[:2], moved[:2]) == 1.0  # k clipped to n-1 = 1: trivially equal


def test_bad_input_is_one_line_error():
    with pytest.raises(ConfigError, match="n_sentences"):
        build_task("minilm", n_sentences=1)
    with pytest.raises(ConfigError, match=r"only \d+ are available"):
        M.sentences(10**6)
    with pytest.raises(TaskError, match="sentence encoder"):
        build_model("minilm", build_task("digits"))

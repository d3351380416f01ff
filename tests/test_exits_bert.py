"""Early exits on a Hugging Face BERT classifier (dict inputs, padded rows): the never-exiting
model equals the original, exited rows equal their head, regrouping keeps each row's attention
mask, calibration works end to end. A tiny BertConfig with random weights (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from torchslim.core.errors import ConfigError
from torchslim.core.task import Task
from torchslim.core.train import TrainConfig, fit
from torchslim.dynamic import ExitConfig, early_exit
from torchslim.dynamic.exits import build, set_threshold
from torchslim.dynamic.policy import simulate

transformers = pytest.importorskip("transformers")


def _bert(num_labels=3, layers=4):
    from torchslim.core.compat import import_torchvision

    import_torchvision()  # transformers imports torchvision when installed (compat.py)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


class _Tokens(Dataset):
    """Random token rows, right-padded (id 0, mask 0) to 12; label = which of tokens 5 / 6 / 7
    appears first among the real tokens (0 when none)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 40, (n, 12), generator=g)
        lengths = torch.randint(3, 13, (n,), generator=g)
        self.mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.y = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            real = self.ids[i, : int(lengths[i])].tolist()
            first = next((t for t in real if t in (5, 6, 7)), None)
            self.y[i] = 0 if first is None else (first - 5) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.y[i]


@pytest.fixture(scope="module")
def task():
    dl = lambda n, s, sh=False: DataLoader(_Tokens(n, s), batch_size=32, shuffle=sh)
    return Task(name="tokens", train=dl(256, 0, True), val=dl(128, 1), test=dl(128, 2), num_classes=3)


def _batch(task, split="test"):
    xs, ys = zip(*task.split(split))
    return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}, torch.cat(ys)


def test_never_exiting_equals_original_and_rows_keep_their_mask(task):
    model = _bert()
    ee = build(model, ExitConfig(layers=["bert.encoder.layer.*"], finetune=None), task).eval()
    assert ee.cut_names == ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
    x, _ = _batch(task)
    assert (x["attention_mask"] == 0).any(), "the test needs padded rows"
    with torch.no_grad():
        ref = model(**x).logits
        torch.testing.assert_close(ee(**x), ref, rtol=1e-5, atol=1e-5)
        # maxprob thresholds that split the batch: some rows leave at each exit
        dense = ee.all_logits(ee.prepare(x))
        conf = torch.softmax(dense[:-1], -1).amax(-1)
        set_threshold(ee, float(conf.flatten().median()))
        out, where = ee.forward_with_exits(x)
        assert len(set(where.tolist())) >= 3
        torch.testing.assert_close(out, dense[where, torch.arange(len(where))], rtol=1e-4, atol=1e-5)
        assert torch.equal(where, simulate(dense, "maxprob", float(ee.thresholds[0])))
        # each row alone (no neighbours, its own mask) gives what the regrouped batch gave
        for i in range(0, len(where), 9):
            o, w = ee.forward_with_exits({k: v[i:i + 1] for k, v in x.items()})
            torch.testing.assert_close(o, out[i:i + 1], rtol=1e-4, atol=1e-5)
            assert int(w) == int(where[i])


def test_bert_exits_calibrated_end_to_end(task):
    model = _bert()
    fit(model, task, TrainConfig(epochs=8, lr=2e-3, seed=0, device="cpu"))
    cfg = ExitConfig(layers=["bert.encoder.layer.0", "bert.encoder.layer.1"], accuracy_drop=0.0, mode="distill",
                     finetune=TrainConfig(epochs=6, lr=3e-3, seed=0, device="cpu"))
    res = early_exit(model, cfg, task)
    info = res.info
    assert info["reference_val_accuracy"] > 0.6  # a backbone worth exiting from (chance: ~0.4)
    assert info["budget_met"] and info["val_accuracy"] >= info["reference_val_accuracy"] - 1e-9
    assert info["exit_rates"][0] > 0.3 and info["expected_cost_frac"] < 0.8  # easy rows leave at the first exit
    assert len(info["exit_rates"]) == 3 and abs(sum(info["exit_rates"]) - 1) < 1e-6
    assert info["torchscript"].startswith("not scriptable")  # stated, not hidden
    ee = res.model.eval()
    x, y = _batch(task)
    seen = []
    hook = ee.final.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with torch.no_grad():
        out, where = ee.forward_with_exits(x)
    hook.remove()
    assert seen == ([] if bool((where < 2).all()) else [int((where == 2).sum())])  # only survivors reach the end
    acc = float((out.argmax(-1) == y).float().mean())
    assert acc == pytest.approx(info["test_accuracy"], abs=1.5 / len(y))


def test_bert_refusals(task):
    model = _bert(layers=2)
    with pytest.raises(ConfigError, match="no BERT layer"):
        build(model, ExitConfig(layers=["encoder.nothing*"], finetune=None), task)

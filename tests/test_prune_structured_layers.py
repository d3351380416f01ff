"""Attention-head / FFN pruning of BERT-style models and whole-layer removal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchslim.core.errors import ConfigError
from torchslim.core.task import Task
from torchslim.pruning.layers import Bypass, LayerDropConfig
from torchslim.pruning.layers import apply as drop_apply
from torchslim.pruning.transformer import TransformerPruneConfig, find_blocks
from torchslim.pruning.transformer import apply as tf_apply
from torchslim.zoo.models import rescnn1d


# ---------------------------------------------------------------------------- transformer
class _Dicts(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _Encoder(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)


def _tiny_bert(layers: int = 2, pad_from: int | None = 8) -> tuple[nn.Module, Task]:
    """BERT from a config (hidden 32, 4 heads of 8, FFN 64), blocks named bert.encoder.layer.N;
    two batches of 4 x 10 tokens, the tokens from ``pad_from`` on padding (None: no padding)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    model = _Encoder(BertModel(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(2):
        ids = torch.randint(0, 50, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.long)
        if pad_from is not None:
            mask[:, pad_from:] = 0
        items.append(({"input_ids": ids, "attention_mask": mask}, torch.randn(4, 32, generator=g)))
    dl = DataLoader(_Dicts(items), batch_size=None)
    return model, Task("tinybert", test=dl, train=dl, loss=nn.functional.mse_loss, metric=lambda o, t: 0.0)


def _gated_reference(model: nn.Module, keep: dict, inputs: dict) -> torch.Tensor:
    """Dense model with removed heads / neurons multiplied by 0 right before the output projections."""
    hooks = []
    for b in find_blocks(model):
        heads_keep, ffn_keep = keep[b.name]
        hmask = torch.zeros(b.heads)
        hmask[heads_keep] = 1
        fmask = torch.zeros(b.ffn_in.out_features)
        fmask[ffn_keep] = 1
        hmask = hmask.repeat_interleave(b.attn.attention_head_size)
        hooks.append(b.attn_out.register_forward_pre_hook(lambda m, a, hm=hmask: (a[0] * hm,)))
        hooks.append(b.ffn_out.register_forward_pre_hook(lambda m, a, fm=fmask: (a[0] * fm,)))
    with torch.no_grad():
        out = model(**inputs)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("criterion,allocation", [("activation", "uniform"), ("taylor", "global"), ("magnitude", "uniform")])
def test_heads_and_ffn_removed_exactly(criterion, allocation):
    model, task = _tiny_bert()
    cfg = TransformerPruneConfig(heads_prune=0.25, ffn_prune=0.25, criterion=criterion, allocation=allocation, batches=2)
    res = tf_apply(model, cfg, task)
    pruned, info = res.model, res.info
    n_heads = [rec["heads_after"] for rec in info["layers"].values()]
    assert sum(n_heads) == 6 and all(h >= 1 for h in n_heads)  # 25% of 8 heads gone
    if allocation == "uniform":
        assert all(rec["ffn_after"] == 48 for rec in info["layers"].values())
    # expected parameter drop: per removed head 4*(d*h + d) - h... computed from the shapes
    d, h = 8, 32
    removed_heads = 8 - sum(n_heads)
    removed_ffn = sum(rec["ffn_before"] - rec["ffn_after"] for rec in info["layers"].values())
    expected = removed_heads * (3 * (h * d + d) + h * d) + removed_ffn * (h + 1 + h)
    assert info["params_before"] - info["params_after"] == expected
    keep = {}
    for b in find_blocks(model):
        rec = info["layers"][b.name]
        scores_keep = torch.tensor(rec["heads_kept"])
        pb = next(x for x in find_blocks(pruned) if x.name == b.name)
        keep[b.name] = (scores_keep, _kept_ffn(b, pb))
    inputs = next(iter(task.test))[0]
    with torch.no_grad():
        out = pruned(**inputs)
    ref = _gated_reference(model, keep, inputs)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    assert find_blocks(model)[0].heads == 4  # the input model is untouched


def _kept_ffn(dense_block, pruned_block) -> torch.Tensor:
    """Which intermediate rows survived (found by matching weight rows)."""
    dense_rows, kept_rows = dense_block.ffn_in.weight, pruned_block.ffn_in.weight
    return torch.cdist(kept_rows, dense_rows).argmin(dim=1)


@pytest.mark.parametrize("kwargs,field", [({"heads_prune": 1.0}, "heads_prune"), ({"ffn_prune": -0.1}, "ffn_prune"),
                                          ({"criterion": "x"}, "criterion"), ({"batches": 0}, "batches")])
def test_transformer_bad_configs(kwargs, field):
    with pytest.raises(ConfigError, match=f"TransformerPruneConfig.{field}"):
        TransformerPruneConfig(**kwargs)


def test_transformer_refuses_model_without_attention():
    _, task = _tiny_bert()
    with pytest.raises(ConfigError, match="no BERT-style layer"):
        tf_apply(nn.Linear(3, 3), TransformerPruneConfig(), task)


# ---------------------------------------------------------------------------- whole layers
def _sig_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 40, generator=g), torch.randint(0, 10, (32,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    return Task("sig", test=dl, train=dl, val=dl, num_classes=10, input_shape=(40,))


def test_remove_named_block_and_refuse_shape_change():
    torch.manual_seed(0)
    model, task = rescnn1d((40,), width=8).eval(), _sig_task()
    res = drop_apply(model, LayerDropConfig(drop=("layers.2",)), task)
    assert isinstance(res.model.layers[2], Bypass) and res.info["removed"] == ["layers.2"]
    x = torch.randn(3, 40)
    with torch.no_grad():  # the result equals running the model with block 2 skipped by hand
        m = model
        h = m.layers[3](m.layers[1](m.layers[0](m.stem(x.reshape(3, 1, 40)))))
        ref = m.fc(m.pool(h).flatten(1))
        assert torch.allclose(res.model(x), ref, atol=1e-6)
    assert res.info["params_before"] - res.info["params_after"] == sum(p.numel() for p in model.layers[2].parameters())
    with pytest.raises(ConfigError, match=r"cannot remove 'layers.1': its input \(2, 8, 40\) and output \(2, 8, 20\) differ"):
        drop_apply(model, LayerDropConfig(drop=("layers.1",)), task)
    with pytest.raises(ConfigError, match="no module named 'layers.9'"):
        drop_apply(model, LayerDropConfig(drop=("layers.9",)), task)


def test_remove_least_important_by_output_change():
    torch.manual_seed(0)
    model, task = rescnn1d((40,), width=8).eval(), _sig_task()
    with torch.no_grad():  # make block 3 nearly a no-op: it becomes the obvious one to drop
        model.layers[3].bn2.weight.mul_(1e-3)
        model.layers[3].bn2.bias.zero_()
    cfg = LayerDropConfig(count=1, layers=["layers.0", "layers.2", "layers.3"], criterion="output", batches=1)
    res = drop_apply(model, cfg, task)
    assert res.info["removed"] == ["layers.3"]
    # the recorded importance is the relative output change when bypassed, recomputed here
    x = next(iter(task.val))[0]
    trial = copy.deepcopy(model)
    trial.layers[0] = Bypass()
    with torch.no_grad():
        a, b = model(x), trial(x)
    assert res.info["importance"]["layers.0"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-4)
    metric = drop_apply(model, LayerDropConfig(count=1, layers=["layers.[03]"], criterion="metric"), task)
    assert set(metric.info["importance"]) == {"layers.0", "layers.3"}


def test_layer_drop_bad_configs():
    with pytest.raises(ConfigError, match="LayerDropConfig.drop: give either drop"):
        LayerDropConfig()
    with pytest.raises(ConfigError, match="LayerDropConfig.drop: give either drop"):
        LayerDropConfig(layers=["layers.2"])  # the old spelling of drop is refused, not taken as candidates
    with pytest.raises(ConfigError, match=r"^LayerDropConfig.candidates: renamed — write layers: \[...\]"):
        LayerDropConfig(count=1, candidates=("layers.0",))
    with pytest.raises(ConfigError, match="LayerDropConfig.criterion"):
        LayerDropConfig(count=1, criterion="x")
    model, task = rescnn1d((40,), width=8).eval(), _sig_task()
    with pytest.raises(ConfigError, match="only 2 shape-preserving"):
        drop_apply(model, LayerDropConfig(count=3, layers=["layers.0", "layers.1", "layers.2"]), task)

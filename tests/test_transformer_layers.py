"""TransformerPruneConfig.layers (issue 11, item 2): the one LayerSelection picks which blocks
lose heads and FFN units; a block it does not select is left whole and named skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.app.recipe import load_recipe
from torchslim.app.report.layers import layer_charts
from torchslim.core.errors import ConfigError
from torchslim.core.selection import LayerSelection
from torchslim.core.task import Task
from torchslim.core.utils import jsonable
from torchslim.pruning.transformer import TransformerPruneConfig, find_blocks
from torchslim.pruning.transformer import apply as tf_apply

pytest.importorskip("transformers")

from test_prune_structured_layers import _tiny_bert


def _bert(layers: int = 3) -> tuple[nn.Module, Task]:
    """The pruning tests' tiny BERT (blocks bert.encoder.layer.N), no padding."""
    return _tiny_bert(layers, pad_from=None)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_excluded_block_keeps_every_head_and_ffn_unit(allocation):
    model, task = _bert(3)
    cfg = TransformerPruneConfig(heads_prune=0.5, ffn_prune=0.25, allocation=allocation, batches=2,
                                 round_ffn_to=1, layers={"exclude": ["*layer.0"]})
    res = tf_apply(model, cfg, task)
    rec = res.info["layers"]
    assert list(rec) == [f"bert.encoder.layer.{i}" for i in range(3)]
    first = rec["bert.encoder.layer.0"]
    assert (first["heads_after"], first["ffn_after"], first["selected"]) == (4, 64, False)
    assert res.info["skipped"] == {"bert.encoder.layer.0": "not selected by layers: every head and FFN unit kept"}
    others = [rec[f"bert.encoder.layer.{i}"] for i in (1, 2)]
    # the asked fractions of the selected blocks' units: 4 of 8 heads, 32 of 128 FFN units
    assert sum(r["heads_before"] - r["heads_after"] for r in others) == 4
    assert sum(r["ffn_before"] - r["ffn_after"] for r in others) == 32
    if allocation == "uniform":
        assert [(r["heads_after"], r["ffn_after"]) for r in others] == [(2, 48), (2, 48)]
    # layer 0 of the pruned model is the dense one, weight for weight; the others are smaller
    dense, pruned = find_blocks(model), find_blocks(res.model)
    for a, b in ((dense[0].attn.query, pruned[0].attn.query), (dense[0].ffn_out, pruned[0].ffn_out)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert pruned[0].heads == 4 and pruned[1].heads + pruned[2].heads == 4
    removed = 4 * (3 * (32 * 8 + 8) + 32 * 8) + 32 * (32 + 1 + 32)  # 4 heads, 32 FFN units
    assert res.info["params_before"] - res.info["params_after"] == removed
    inputs = next(iter(task.test))[0]
    with torch.no_grad():
        assert torch.isfinite(res.model(**inputs)).all()
    assert find_blocks(model)[1].heads == 4  # the input model is untouched
    chart = layer_charts({"rows": [{"stage": "transformer_prune", "info": jsonable(res.info)}]})[0]
    assert chart.marked == [True, False, False] and chart.marked_means == "not selected by layers (kept whole)"
    assert chart.labels["heads kept"][0] == "4/4" and chart.series["FFN units kept"][0] == 1.0


def test_include_selects_the_blocks_pruned():
    model, task = _bert(3)
    cfg = TransformerPruneConfig(heads_prune=0.25, ffn_prune=0.5, batches=1, layers=["*layer.2"])
    rec = tf_apply(model, cfg, task).info["layers"]
    assert [(r["heads_after"], r["ffn_after"]) for r in rec.values()] == [(4, 64), (4, 64), (3, 32)]


def test_a_recipe_with_layers_validates():
    recipe = {"task": "digits", "model": "lenet300",
              "stages": [{"transformer_prune": {"heads_prune": 0.5, "layers": {"exclude": ["*layer.0"]}}}]}
    cfg = load_recipe(recipe).stages[0].config
    assert isinstance(cfg, TransformerPruneConfig)
    assert cfg.layers == LayerSelection(exclude=("*layer.0",)) and cfg.heads_prune == 0.5
    listed = load_recipe({**recipe, "stages": [{"transformer_prune": {"layers": ["*layer.1"]}}]}).stages[0].config
    assert listed.layers.include == ("*layer.1",)


@pytest.mark.parametrize("layers,match", [
    ({"exclude": ["*layer.9"]}, (r"^TransformerPruneConfig\.layers\.exclude: no module matches \['\*layer\.9'\] in the "
                                 r"model; the blocks are named 'bert\.encoder\.layer\.0', ")),
    (["encoder.layer.*"], r"^TransformerPruneConfig\.layers\.include: no module matches \['encoder\.layer\.\*'\]"),
    ({"include": ["*.attention"]}, r"^TransformerPruneConfig\.layers: selects none of the 2 blocks \(layers: "),
])
def test_a_pattern_that_matches_nothing_is_refused_in_one_line(layers, match):
    model, task = _bert(2)
    with pytest.raises(ConfigError, match=match) as err:
        tf_apply(model, TransformerPruneConfig(batches=1, layers=layers), task)
    assert "\n" not in str(err.value)


def test_nn_transformer_encoder_is_refused_with_or_without_layers():
    """nn.TransformerEncoder's attention is one nn.MultiheadAttention (packed in_proj, which needs
    num_heads * head_dim == embed_dim): heads cannot be removed in place, so it stays refused."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    dl = DataLoader(TensorDataset(torch.randn(4, 5, 16), torch.randn(4, 5, 16)), batch_size=4)
    task = Task("seq", test=dl, train=dl, loss=nn.functional.mse_loss)
    for layers in (None, {"exclude": ["*layers.0"]}):
        cfg = TransformerPruneConfig(batches=1) if layers is None else TransformerPruneConfig(batches=1, layers=layers)
        with pytest.raises(ConfigError, match=r"^TransformerPruneConfig: no BERT-style layer .* use StructuredPruneConfig"):
            tf_apply(model, cfg, task)

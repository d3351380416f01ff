"""Weight sharing: k-means codebooks, zeros kept, centroid gradients, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.core.errors import ConfigError
from torchslim.core.stage import apply_stage
from torchslim.core.train import TrainConfig
from torchslim.sharing import (
    ShareConfig,
    SharedWeight,
    apply,
    cluster_weight,
    init_centroids,
    shared_layers,
)
from torchslim.zoo import build_model, build_task


@pytest.fixture(scope="module")
def task():
    return build_task("digits", batch_size=64)


def pruned_mlp(seed: int = 0, keep: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", None, in_shape=(64,), num_classes=10, hidden=(32,))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                thresh = w.abs().flatten().kthvalue(int(w.numel() * (1 - keep))).values
                w.mul_(w.abs() > thresh)
    return model


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_clustering_limits_distinct_values_and_keeps_zeros(bits, task):
    model = pruned_mlp()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    result = apply(model, ShareConfig(bits=bits), task)
    assert set(shared_layers(model)) == set(before)
    for name, w0 in before.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(w == 0, w0 == 0)  # exactly the pruned weights are zero
        assert len(torch.unique(w[w != 0])) <= 2**bits
        rec = result.info["layers"][name]
        assert rec["nonzeros"] == int((w0 != 0).sum()) and rec["k"] <= 2**bits and rec["numel"] == w0.numel()
        # every weight sits on its nearest centroid (k-means' fixed point), within float32 rounding
        book = model.get_submodule(name).parametrizations.weight[0].codebook.detach()
        nearest = book[(w0[w0 != 0][:, None] - book[None]).abs().argmin(1)]
        assert torch.allclose(w[w != 0], nearest, atol=1e-6)
    assert result.save is not None


def test_two_clusters_give_their_means():
    # hand reference: two well-separated groups, 1 bit -> the centroids are the group means
    w = torch.tensor([[0.0, -1.0, -1.2, 0.0], [2.0, 2.4, 0.0, -0.8]])
    book, idx, mask, _ = cluster_weight(w, bits=1, init="linear")
    assert torch.allclose(book.sort().values, torch.tensor([-1.0, 2.2]), atol=1e-6)
    assert torch.equal(mask, w != 0)
    assert torch.equal(idx[w == 0], torch.zeros(3, dtype=torch.uint8))


def test_few_values_are_kept_exactly():
    w = torch.tensor([[0.5, 0.25, 0.0], [0.5, -0.75, 0.25]])
    book, idx, mask, inertia = cluster_weight(w, bits=2)
    assert torch.equal((book[idx.long()] * mask), w) and inertia == 0.0


def test_inits_follow_the_paper():
    vals = np.array([-3.0, -1.0, 0.5, 0.6, 0.7, 4.0])
    assert np.allclose(init_centroids(vals, 4, "linear", 0), [-3.0, -3 + 7 / 3, -3 + 14 / 3, 4.0])
    assert np.allclose(init_centroids(vals, 3, "density", 0), np.quantile(vals, [0, 0.5, 1]))
    rnd = init_centroids(vals, 3, "random", 0)
    assert len(set(rnd)) == 3 and set(rnd) <= set(vals)


def test_centroid_gradient_is_scatter_sum_of_weight_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.4)
    dense = nn.Linear(12, 7)
    x = torch.randn(5, 12)
    apply(layer, ShareConfig(bits=2, layers=("",)), None)
    p: SharedWeight = layer.parametrizations.weight[0]
    dense.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    (layer(x) ** 2).sum().backward()
    (dense(x) ** 2).sum().backward()
    # hand reference (Deep Compression eq. 3): dL/dc_k = sum of dL/dW_ij over weights with index k
    hand = torch.zeros_like(p.codebook).index_add_(0, p.indices[p.mask].long(), dense.weight.grad[p.mask])
    assert torch.allclose(p.codebook.grad, hand, rtol=1e-5, atol=1e-6)
    assert layer.parametrizations.weight.original.grad is None  # the dense weight is not trained


def test_centroid_finetune_keeps_structure_and_learns(task):
    model = pruned_mlp(keep=0.5)
    cfg = ShareConfig(bits=3, finetune=TrainConfig(epochs=1, max_steps=15, lr=3e-3, device="cpu"), fp16_floats=True)
    books0 = {n: p.codebook.detach().clone() for n, p in shared_layers(apply(pruned_mlp(keep=0.5), ShareConfig(bits=3), task).model).items()}
    zeros0 = {n: m.weight.detach() == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    result = apply_stage(model, cfg, task)
    model = result.model  # a stage returns a new model (the input is not modified)
    assert result.info["finetune"]["steps"] == 15
    for name, p in shared_layers(model).items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(w == 0, zeros0[name])
        assert len(torch.unique(w[w != 0])) <= 8
        assert not torch.allclose(p.codebook.detach(), books0[name])  # the centroids moved
        assert torch.equal(p.codebook.detach().half().float(), p.codebook.detach())  # fp16 values
    bias = model.net[1].bias.detach()
    assert torch.equal(bias.half().float(), bias)


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 0}, "ShareConfig.bits"),
    ({"bits": 9}, "ShareConfig.bits"),
    ({"bits": 2.5}, "ShareConfig.bits"),
    ({"bits": {"net.1": 4, "net.3": 12}}, "ShareConfig.bits"),
    ({"bits": {}}, "ShareConfig.bits"),
    ({"init": "kmeans++"}, "ShareConfig.init"),
    ({"layers": ()}, "ShareConfig.layers"),
    ({"finetune": {"epochs": -1}}, "ShareConfig.finetune.epochs"),
    ({"finetune": 3}, "ShareConfig.finetune"),
    ({"layers": {"include": []}}, "ShareConfig.layers.include"),
    ({"max_iter": 0}, "ShareConfig.max_iter"),
])
def test_bad_configs_fail_in_one_line(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ShareConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg


def test_bad_use_fails_before_work(task):
    with pytest.raises(ConfigError, match="ShareConfig.layers"):
        apply(pruned_mlp(), ShareConfig(layers=("conv*",)), task)
    with pytest.raises(ConfigError, match="ShareConfig.finetune"):
        apply(pruned_mlp(), ShareConfig(finetune=TrainConfig(epochs=1)), None)


def test_per_layer_bits_by_pattern(task):
    model = pruned_mlp()
    info = apply(model, ShareConfig(bits={"net.1": 2}), task).info
    assert list(info["layers"]) == ["net.1"] and info["layers"]["net.1"]["k"] <= 4
    assert not torch.nn.utils.parametrize.is_parametrized(model.net[3])

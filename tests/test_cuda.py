"""The CUDA paths: AMP training, CUDA peak memory, 2:4 semi-structured sparse kernels,
torch.compile. They need an NVIDIA GPU and skip with that reason anywhere else (tolerances:
fp16 kernels agree with fp32/dense references to ~1e-3 relative; we allow 2e-2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the CUDA paths need an NVIDIA GPU"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def _digits():
    from torchslim.zoo import build_model, build_task

    task = build_task("digits", batch_size=64, seed=0)
    torch.manual_seed(0)
    return task, build_model("lenet300", task)


def test_amp_trains_in_fp16_and_matches_fp32():
    from torchslim.core.train import TrainConfig, fit

    task, model = _digits()
    fp32 = copy.deepcopy(model)
    dtypes = []
    handle = model.net[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    cfg = {"epochs": 3, "lr": 0.05, "optimizer": "SGD", "optimizer_kwargs": {"momentum": 0.9}, "device": "cuda"}
    fit(model, task, TrainConfig(**cfg, amp=True))
    handle.remove()
    fit(fp32, task, TrainConfig(**cfg))
    assert dtypes and set(dtypes) == {torch.float16}  # autocast really ran the Linear in fp16
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert abs(task.evaluate(model) - task.evaluate(fp32)) < 0.03


def test_cuda_peak_memory_counts_the_activation():
    from torchslim.core.measure.memory import peak_memory

    layer = nn.Linear(1024, 1024).cuda()
    x = torch.randn(512, 1024, device="cuda")
    layer(x)  # warm: cuBLAS workspace and allocator blocks exist before we count
    peak, kind = peak_memory(lambda: layer(x), "cuda")
    out_bytes = 512 * 1024 * 4
    assert kind == "cuda max_memory_allocated delta"
    assert out_bytes <= peak <= 2 * out_bytes + (1 << 20)


def test_2_4_semi_structured_kernels_match_dense():
    from torchslim.core.stage import apply_stage
    from torchslim.pruning.nm import NMConfig, check_nm
    from torchslim.zoo import build_task

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128)).half().cuda().eval()
    result = apply_stage(model, NMConfig(n=2, m=4), build_task("digits"))
    assert result.info["accelerated"], result.info["note"]
    from torch.sparse import SparseSemiStructuredTensor

    x = torch.randn(128, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        h = x
        for layer in result.model:
            if isinstance(layer, nn.Linear) and isinstance(layer.weight, SparseSemiStructuredTensor):
                dense = layer.weight.to_dense()
                assert check_nm(dense, 2, 4)
                ref = torch.nn.functional.linear(h, dense, layer.bias)
                h = layer(h)
                assert torch.allclose(h.float(), ref.float(), rtol=2e-2, atol=2e-2)
            else:
                h = layer(h)


def test_torch_compile_matches_eager_on_cuda():
    task, model = _digits()
    model = model.cuda().eval()
    x = task.example_inputs(64).cuda()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_fit_under_amp_keeps_pruning_masks():
    import torchslim
    from torchslim.core.train import TrainConfig
    from torchslim.pruning import PruneConfig
    from torchslim.pruning.masks import masks_of

    task, model = _digits()
    cfg = PruneConfig(sparsity=0.8, finetune=TrainConfig(epochs=1, device="cuda", amp=True))
    pruned = torchslim.prune(model.cuda(), cfg, task).model
    for name, mask in masks_of(pruned).items():
        weight = dict(pruned.named_parameters())[name]
        assert int(torch.count_nonzero(weight[~mask])) == 0

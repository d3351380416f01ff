"""``core.utils.eval_mode`` gives every submodule back its own mode (issue 11, item 6): a model
in train mode with a BatchNorm a user froze in eval keeps it frozen after any helper that runs
the model in eval, which ``model.train(was)`` did not. Every former hand-written save/restore
site is checked with such a model: in eval while it runs, every module's own mode after."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.task import Task
from torchslim.core.utils import eval_mode


def frozen_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model.train()
    model[1].eval()  # frozen BatchNorm inside a model in train mode
    return model


def modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


FROZEN = {"": True, "0": True, "1": False, "2": True, "3": True}


def test_one_submodule_in_eval_keeps_its_mode():
    model = frozen_bn_model()
    with eval_mode(model) as m:
        assert m is model and not any(modes(model).values())
    assert modes(model) == FROZEN
    with eval_mode(model, training=True):
        assert all(modes(model).values())
    assert modes(model) == FROZEN
    plain = frozen_bn_model()
    plain.eval()
    plain.train(True)  # what the old restore, model.train(was), did: the freeze is lost
    assert modes(plain)["1"] is True


def test_restored_after_an_error_and_new_modules_take_the_model_mode():
    model = frozen_bn_model()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        model.add_module("4", nn.Dropout())
        raise RuntimeError("boom")
    assert modes(model) == {**FROZEN, "4": True}
    model.eval()
    with eval_mode(model, training=True):
        pass
    assert not any(modes(model).values())


def _task() -> Task:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    return Task(name="tiny", test=loader, train=loader, val=loader)


def _measure(model, task, x):
    from torchslim.core.measure import MeasureConfig, measure

    rec = measure(model, task, MeasureConfig(batch_size=4, latency=False, memory=False))
    assert rec.macs_per_sample == 8 * 16 + 16 * 4 and 0.0 <= rec.metric <= 1.0


def _macs(model, task, x):
    from torchslim.core.measure.latency import count_macs_detail

    assert count_macs_detail(model, x)[0] == 4 * (8 * 16 + 16 * 4)


def _hooked(model, task, x):
    from torchslim.lowrank.speed import layer_inputs

    seen = layer_inputs(model, {"3": model[3]}, x)
    assert seen["3"].shape == (4, 16)


def _edges(model, task, x):
    from torchslim.quantization.smooth import trace_edges

    producer, _ = trace_edges(model, x)
    assert producer == {"1": "0", "2": "1", "3": "2"}


def _float_mode(model, task, x):
    from torchslim.quantization.calibrate import float_mode

    with float_mode(model), torch.no_grad():
        model(x)


def _val_grads(model, task, x):
    from torchslim.pruning.regrow import val_loss_and_grads

    loss, grads = val_loss_and_grads(model, task, ["3.weight"])
    assert loss > 0 and grads["3.weight"].shape == (4, 16) and model[3].weight.grad is None


SITES = {"measure": _measure, "count_macs_detail": _macs, "lowrank.hooked_forward": _hooked,
         "smooth.trace_edges": _edges, "calibrate.float_mode": _float_mode, "regrow.val_loss_and_grads": _val_grads}


@pytest.mark.parametrize("site", SITES)
def test_every_former_site_runs_in_eval_and_keeps_each_module_mode(site):
    model, task = frozen_bn_model(), _task()
    seen: list[bool] = []
    model[3].register_forward_pre_hook(lambda m, args: seen.append(any(modes(model).values())))
    stats, n_hooks = (model[1].running_mean.clone(), int(model[1].num_batches_tracked)), hooks(model)
    SITES[site](model, task, torch.randn(4, 8))
    assert seen and not any(seen)  # every forward ran in eval mode
    assert modes(model) == FROZEN and hooks(model) == n_hooks  # and its hooks are gone
    assert torch.equal(model[1].running_mean, stats[0]) and int(model[1].num_batches_tracked) == stats[1]


def test_structured_pruning_returns_the_copy_in_each_module_mode():
    pytest.importorskip("torch_pruning")
    from torchslim.pruning.structured import StructuredPruneConfig, prune_structured

    model, task = frozen_bn_model(), _task()
    task.example_inputs = lambda batch_size=None, split="test": torch.randn(batch_size or 4, 8)
    pruned, info = prune_structured(model, StructuredPruneConfig(macs_keep=0.6), task)
    assert pruned is not model and modes(pruned) == FROZEN and modes(model) == FROZEN
    assert pruned[0].out_features < 16 and info["macs_after"] < info["macs_before"]

"""B4's scarce-label setting: hidden labels are never used, the subset is stratified, and
distillation trains (finite losses) on batches that carry no label at all."""

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torchslim.core.task import Task
from torchslim.core.train import TrainConfig
from torchslim.distillation import DistillConfig
from torchslim.distillation import apply as distill
from torchslim.zoo import build_model
from torchslim.zoo.data import loaders_from_arrays

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _b4():
    spec = importlib.util.spec_from_file_location("b4_distillation", ROOT / "benchmarks" / "b4_distillation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _task(n: int = 400, seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 40)).astype(np.float32)
    y = np.arange(n) % 10
    splits = {"train": (x, y), "val": (x[:50], y[:50]), "test": (x[:100], y[:100])}
    return Task(name="toy", num_classes=10, input_shape=(40,), **loaders_from_arrays(splits, 32, seed))


def test_masked_ce_matches_cross_entropy_on_labeled_entries():
    b4 = _b4()
    torch.manual_seed(0)
    out = torch.randn(8, 10, requires_grad=True)
    t = torch.tensor([3, -1, 7, -1, -1, 0, 9, -1])
    keep = t >= 0
    ref = F.cross_entropy(out[keep], t[keep])
    assert torch.allclose(b4.masked_ce(out, t), ref, atol=1e-6)
    none = b4.masked_ce(out, torch.full((8,), -1))  # no labeled entry: 0, not NaN
    none.backward()
    assert none.item() == 0.0 and torch.equal(out.grad, torch.zeros_like(out))


def test_labeled_subset_is_stratified_and_seed_dependent():
    b4 = _b4()
    y = torch.as_tensor(np.arange(1000) % 10)
    a, b = b4.labeled_subset(y, 0.03, 0), b4.labeled_subset(y, 0.03, 1)
    assert len(a) == 30 and len(set(a.tolist())) == 30
    assert torch.bincount(y[a], minlength=10).tolist() == [3] * 10  # 3% of 100 per class
    assert not torch.equal(a, b)


def test_scarce_label_tasks_hide_every_label_outside_the_subset():
    b4 = _b4()
    task = _task()
    x, y = task.train.dataset.tensors
    keep = b4.labeled_subset(y, 0.05, 0)
    extra = torch.randn(100, 40)
    alone, kd = b4.scarce_label_tasks(task, keep, extra, seed=0)
    assert alone.val is None and kd.val is None  # no val labels reach a student
    ax, ay = alone.train.dataset.tensors
    assert torch.equal(ax, x[keep]) and torch.equal(ay, y[keep])
    kx, ky = kd.train.dataset.tensors
    assert len(kx) == len(x) + 100 and torch.equal(kx[len(x):], extra)
    labeled = (ky != -1).nonzero().flatten()
    assert torch.equal(labeled, keep) and torch.equal(ky[keep], y[keep])


def test_distillation_runs_on_batches_without_labels():
    b4 = _b4()
    task = _task()
    y = task.train.dataset.tensors[1]
    keep = b4.labeled_subset(y, 0.05, 0)  # 20 labels in 500 inputs: most batches of 32 have none or few
    _, kd = b4.scarce_label_tasks(task, keep, torch.randn(100, 40), seed=0)
    torch.manual_seed(0)
    teacher = build_model("mlp", task, hidden=(16,))
    student = build_model("mlp", task, hidden=(8,))
    cfg = DistillConfig(teacher=teacher, temperature=2.0, alpha=0.9,
                        finetune=TrainConfig(epochs=1, max_steps=12, lr=1e-2, seed=0, device="cpu"))
    fit = distill(student, cfg, kd).info["fit"]
    assert fit["steps"] == 12 and np.isfinite(fit["history"][0]["train_loss"])

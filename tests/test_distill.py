"""Distillation: KD loss closed form and gradient, the loss mix, features, unlabeled, configs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.errors import ConfigError
from torchslim.core.stage import apply_stage
from torchslim.core.task import Task
from torchslim.core.train import TrainConfig, fit
from torchslim.distillation import DistillationHook, DistillConfig, distill_task, kd_loss


def _softmax(v: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def _hand_kd(s: list[list[float]], t: list[list[float]], temp: float) -> float:
    """T² · mean over samples of Σ_i p_i log(p_i / q_i), p = softmax(t/T), q = softmax(s/T)."""
    total = 0.0
    for srow, trow in zip(s, t):
        p, q = _softmax(trow, temp), _softmax(srow, temp)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return temp**2 * total / len(s)


S = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
T = [[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]]


@pytest.mark.parametrize("temp", [1.0, 2.0, 5.0])
def test_kd_loss_equals_hand_computation_and_gradient_closed_form(temp):
    s = torch.tensor(S, requires_grad=True)
    loss = kd_loss(s, torch.tensor(T), temp)
    assert loss.item() == pytest.approx(_hand_kd(S, T, temp), rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # d/ds [T² KL(p || softmax(s/T))] = T (q - p), averaged over the batch of 2.
    q = torch.tensor([_softmax(r, temp) for r in S])
    p = torch.tensor([_softmax(r, temp) for r in T])
    torch.testing.assert_close(s.grad, temp * (q - p) / 2, atol=1e-6, rtol=1e-5)


def test_t_squared_scaling_and_zero_when_equal():
    s, t = torch.tensor(S), torch.tensor(T)
    raw = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean")
    assert kd_loss(s, t, 3.0).item() == pytest.approx(9 * raw.item(), rel=1e-6)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def _task(n: int = 64, labeled: bool = True, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    train_y = y if labeled else torch.full_like(y, -1)  # -1 would make cross-entropy fail
    train = DataLoader(TensorDataset(x, train_y), batch_size=16, shuffle=True, generator=g)
    return Task(name="toy", train=train, test=DataLoader(TensorDataset(x, y), batch_size=64), num_classes=3)


def _mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_total_loss_is_alpha_mix_of_hard_and_soft():
    task, teacher, student = _task(), _mlp(32, 0), _mlp(8, 1)
    cfg = DistillConfig(teacher=teacher, temperature=2.0, alpha=0.3)
    hook = DistillationHook(teacher, cfg)
    x, y = next(iter(task.test))
    hook.setup(student, x)
    out = student(x)
    total = distill_task(task, cfg.alpha, cfg.unlabeled).loss(out, y) + hook.extra_loss(student, x, out, y)
    want = 0.7 * F.cross_entropy(out, y) + 0.3 * _hand_kd(out.tolist(), teacher(x).tolist(), 2.0)
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    hook.close()


def test_feature_distillation_trains_the_projection():
    task, teacher, student = _task(), _mlp(32, 0), _mlp(8, 1)
    cfg = DistillConfig(teacher=teacher, features={"0": "0"}, feature_weight=1.0, alpha=0.5)
    hook = DistillationHook(teacher, cfg)
    x, _ = next(iter(task.test))
    hook.setup(student, x)
    proj = hook.projections["0"]
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (8, 32)
    w0 = proj.weight.detach().clone()
    with torch.no_grad():
        student(x), teacher(x)
        before = hook.feature_loss().item()
    params = list(student.parameters()) + hook.parameters()
    fit(student, distill_task(task, cfg.alpha, False), TrainConfig(epochs=15, lr=1e-2, device="cpu"), hooks=[hook], params=params)
    assert not torch.equal(w0, proj.weight.detach())  # the projection was optimized
    with torch.no_grad():
        student(x), teacher(x)
        after = hook.feature_loss().item()
    assert after < 0.5 * before, (before, after)
    hook.close()
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


def test_conv_features_get_a_1x1_conv_projection():
    teacher = nn.Sequential(nn.Conv1d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 10, 3))
    student = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10, 3))
    hook = DistillationHook(teacher, DistillConfig(teacher=teacher, features={"0": "0"}))
    hook.setup(student, torch.randn(2, 1, 10))
    proj = hook.projections["0"]
    assert isinstance(proj, nn.Conv1d) and proj.kernel_size == (1,) and (proj.in_channels, proj.out_channels) == (4, 16)
    hook.close()


def test_unlabeled_mode_never_reads_targets_and_moves_student_to_teacher():
    task, teacher, student = _task(labeled=False), _mlp(32, 0), _mlp(8, 1)
    x, _ = next(iter(task.test))
    gap_before = kd_loss(student(x), teacher(x), 1.0).item()
    cfg = DistillConfig(teacher=teacher, unlabeled=True, temperature=2.0, finetune=TrainConfig(epochs=20, lr=1e-2, device="cpu"))
    res = apply_stage(student, cfg, task)  # through the stage registry
    with torch.no_grad():
        gap_after = kd_loss(res.model(x), teacher(x), 1.0).item()
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)
    with pytest.raises((IndexError, RuntimeError)):  # the same labels would break a plain fit
        fit(_mlp(8, 1), task, TrainConfig(epochs=1, device="cpu"))


def test_apply_leaves_the_teacher_untouched_and_records_metrics():
    task, teacher, student = _task(), _mlp(32, 0), _mlp(8, 1)
    fit(teacher, task, TrainConfig(epochs=10, lr=1e-2, device="cpu"))
    t_state = copy.deepcopy(teacher.state_dict())
    res = apply_stage(student, DistillConfig(teacher=teacher, finetune=TrainConfig(epochs=10, lr=1e-2, device="cpu")), task)
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())
    assert res.info["student_metric_after"] > res.info["student_metric_before"]
    assert res.info["teacher_metric"] == pytest.approx(task.evaluate(teacher))


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": 0}, "DistillConfig.temperature"),
    ({"temperature": -1.0}, "DistillConfig.temperature"),
    ({"alpha": 1.5}, "DistillConfig.alpha"),
    ({"alpha": -0.1}, "DistillConfig.alpha"),
    ({"teacher": 3}, "DistillConfig.teacher"),
    ({"features": {"a": 1}}, "DistillConfig.features.a"),
    ({"finetune": {"epochs": -1}}, "DistillConfig.finetune.epochs"),
    ({"finetune": None}, "DistillConfig.finetune"),
])
def test_bad_configs_one_line(kwargs, field):
    with pytest.raises(ConfigError) as e:
        DistillConfig(**kwargs)
    assert str(e.value).startswith(field + ":") and "\n" not in str(e.value)


def test_shape_mismatch_and_unknown_layers_fail_before_training():
    task, student = _task(), _mlp(8, 1)
    before = copy.deepcopy(student.state_dict())
    wrong = nn.Sequential(nn.Linear(12, 5))  # 5 classes, the student has 3
    with pytest.raises(ConfigError, match=r"^DistillConfig.teacher: teacher outputs shape \(8, 5\) but the student \(8, 3\)"):
        apply_stage(student, DistillConfig(teacher=wrong), task)
    with pytest.raises(ConfigError, match="^DistillConfig.features: student has no module 'fc1'"):
        apply_stage(student, DistillConfig(teacher=_mlp(32, 0), features={"fc1": "0"}), task)
    with pytest.raises(ConfigError, match="^DistillConfig.features: teacher has no module 'nope'"):
        apply_stage(student, DistillConfig(teacher=_mlp(32, 0), features={"0": "nope"}), task)
    with pytest.raises(ConfigError, match="^DistillConfig.teacher: no teacher given"):
        apply_stage(student, DistillConfig(), task)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert not student[0]._forward_hooks


def test_transfer_example_smoke():
    """examples/transfer_minilm.py end to end with tiny data and one step per phase."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parents[1] / "examples" / "transfer_minilm.py"
    spec = importlib.util.spec_from_file_location("transfer_minilm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(smoke=True)
    assert [r["step"] for r in rows][-1] == "low-rank + distilled"
    dense, low = rows[1], rows[2]
    assert low["macs"] < 0.75 * dense["macs"] and low["bytes"] < dense["bytes"]
    # distillation trains the compressed student without undoing it: same MACs, same bytes
    distilled = rows[3]
    assert (distilled["macs"], distilled["bytes"]) == (low["macs"], low["bytes"])
    assert rows[0]["macs"] == dense["macs"]  # fine-tuning changes no structure


def test_recovery_after_unstructured_pruning_keeps_pruned_weights_zero():
    """Distillation as recovery: the stage's fit gets the pruning MaskKeeper (training_hooks)."""
    prune = pytest.importorskip("torchslim.pruning")
    task, teacher = _task(), _mlp(32, 0)
    fit(teacher, task, TrainConfig(epochs=10, lr=1e-2, device="cpu"))
    pruned = apply_stage(copy.deepcopy(teacher), prune.PruneConfig(sparsity=0.7), task).model
    zeros = {n: (p == 0) for n, p in pruned.named_parameters() if p.dim() == 2}
    assert sum(z.sum().item() for z in zeros.values()) > 0
    res = apply_stage(pruned, DistillConfig(teacher=teacher, finetune=TrainConfig(epochs=5, lr=1e-2, device="cpu")), task)
    for n, p in res.model.named_parameters():
        if n in zeros:
            assert (p[zeros[n]] == 0).all(), n
    assert res.info["student_metric_after"] >= res.info["student_metric_before"] - 1e-6

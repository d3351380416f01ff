"""Bad data and bad weights are refused before work, in one line naming the problem (issue 12,
point 4); a loss that goes non-finite in training names the step and the cause."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.data_check import check_task_and_model
from torchslim.core.errors import TaskError
from torchslim.core.task import Task
from torchslim.core.train import TrainConfig, TrainingError, fit


def _task(x=None, y=None, train=True, n=64, classes=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g) if x is None else x
    y = torch.randint(0, classes, (n,), generator=g) if y is None else y
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return Task(name="toy", test=loader, train=loader if train else None, num_classes=None)


def _model(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


def test_good_data_passes():
    check_task_and_model(_task(), _model(), training=True)


@pytest.mark.parametrize("case,match", [
    ("nan features", "NaN/Inf value\\(s\\) in inputs"),
    ("inf features", "NaN/Inf value\\(s\\) in inputs"),
    ("labels out of range", "labels in \\[0, 7\\] but the model has 3 outputs"),
    ("negative labels", "labels in \\[-1, "),
    ("empty test split", "test split is empty"),
    ("no train split but training", "train split is missing"),
    ("nan weights", "holds 1 NaN/Inf"),
])
def test_bad_input_is_refused_in_one_line(case, match):
    model, task = _model(), _task()
    if case == "nan features":
        x = torch.randn(64, 4)
        x[37, 2] = float("nan")
        task = _task(x=x)
    elif case == "inf features":
        x = torch.randn(64, 4)
        x[3, 0] = float("inf")
        task = _task(x=x)
    elif case == "labels out of range":
        task = _task(y=torch.arange(64) % 8)
    elif case == "negative labels":
        task = _task(y=torch.arange(64) % 3 - 1)
    elif case == "empty test split":
        task = _task(x=torch.zeros(0, 4), y=torch.zeros(0, dtype=torch.long))
    elif case == "no train split but training":
        task = _task(train=False)
    elif case == "nan weights":
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    with pytest.raises(TaskError, match=match) as info:
        check_task_and_model(task, model, training=True)
    assert "\n" not in str(info.value)


def test_training_names_the_step_when_the_loss_goes_nan():
    task = _task()
    model = _model()
    with torch.no_grad():  # finite but huge weights: the outputs overflow to inf at the first step
        for p in model.parameters():
            p.mul_(1e20)
    with pytest.raises(TrainingError, match=r"step 1 \(epoch 1\).*diverged.*lower TrainConfig.lr"):
        fit(model, task, TrainConfig(epochs=1, lr=1.0, optimizer="SGD", device="cpu"))
    bad = _model()
    with torch.no_grad():
        bad[2].bias[0] = float("inf")
    with pytest.raises(TrainingError, match="weight 2.bias is NaN/Inf"):
        fit(bad, task, TrainConfig(epochs=1, device="cpu"))

"""Distillation's per-layer numbers (issue 11, item 7): the stage info records, per matched layer
pair, the feature loss at the start and the end of training (logit-only distillation says it has
none), and the report draws one per-layer chart carrying exactly those numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.app.report.layers import layer_charts
from torchslim.core.stage import apply_stage
from torchslim.core.task import Task
from torchslim.core.train import TrainConfig
from torchslim.core.utils import jsonable
from torchslim.distillation import DistillConfig


def _task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)
    return Task(name="toy", train=train, test=DataLoader(TensorDataset(x, y), batch_size=96), num_classes=3)


def _mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 3))


def _mse(student: nn.Module, teacher: nn.Module, s_name: str, t_name: str, x: torch.Tensor) -> float:
    """The feature MSE of one same-width pair, by hand (forward hooks on both modules)."""
    got = {}
    hs = dict(student.named_modules())[s_name].register_forward_hook(lambda m, a, o: got.__setitem__("s", o))
    ht = dict(teacher.named_modules())[t_name].register_forward_hook(lambda m, a, o: got.__setitem__("t", o))
    with torch.no_grad():
        student.eval()(x), teacher.eval()(x)
    hs.remove(), ht.remove()
    return F.mse_loss(got["s"], got["t"]).item()


@pytest.fixture(scope="module")
def distilled():
    task, teacher, student = _task(), _mlp(48, 0), _mlp(8, 1)
    cfg = DistillConfig(teacher=teacher, features={"2": "2", "0": "0"}, feature_weight=5.0, alpha=0.5,
                        finetune=TrainConfig(epochs=12, lr=1e-2, device="cpu"))
    res = apply_stage(student, cfg, task)
    return task, teacher, student, res


def test_info_records_each_pairs_feature_loss_at_start_and_end(distilled):
    task, teacher, student, res = distilled
    layers = res.info["layers"]
    assert list(layers) == ["2", "0"] and {r["teacher"] for r in layers.values()} == {"2", "0"}
    x = task.example_inputs(split="test")[:64]  # the probe: the first test batch, cut to 64 rows
    # "2" -> "2" has the same width (16): no projection, so both numbers can be computed by hand,
    # the start from the input student (a stage never modifies it), the end from the result
    assert layers["2"]["feature_loss_start"] == pytest.approx(_mse(student, teacher, "2", "2", x), rel=1e-5)
    assert layers["2"]["feature_loss_end"] == pytest.approx(_mse(res.model, teacher, "2", "2", x), rel=1e-5)
    # training lowered both pairs' losses, the projected one (8 -> 48 wide) included: measured
    # end/start 0.12 ("2") and 0.15 ("0"); bound 0.3
    for rec in layers.values():
        assert 0 <= rec["feature_loss_end"] < 0.3 * rec["feature_loss_start"], rec
    assert "per_layer" not in res.info


def test_logit_only_distillation_says_it_has_no_per_layer_numbers():
    task, teacher, student = _task(), _mlp(48, 0), _mlp(8, 1)
    res = apply_stage(student, DistillConfig(teacher=teacher, finetune=TrainConfig(epochs=1, device="cpu")), task)
    assert res.info["layers"] == {}
    assert res.info["per_layer"].startswith("none: logit-only distillation")
    assert layer_charts({"rows": [{"stage": "distill", "info": jsonable(res.info)}]}) == []


def test_report_draws_one_chart_with_the_info_numbers(distilled):
    *_, res = distilled
    info = jsonable(res.info)
    charts = layer_charts({"rows": [{"stage": "baseline", "info": {}}, {"stage": "distill", "info": info}]})
    assert [c.technique for c in charts] == ["distill"]
    chart = charts[0]
    assert chart.id == "layers-distill-distill" and chart.layers == ["2", "0"]
    start = [info["layers"][n]["feature_loss_start"] for n in ("2", "0")]
    end = [info["layers"][n]["feature_loss_end"] for n in ("2", "0")]
    assert chart.series == {"start of training": start, "end of training": end}
    assert chart.labels["start of training"] == [f"{v:.3g}" for v in start]
    assert chart.marked == [False, False]  # no pair's loss rose
    pytest.importorskip("matplotlib")
    from torchslim.app.report import charts as draw

    svg = draw.to_svg(draw.bar_chart(chart))
    assert svg.startswith("<svg") and f"{end[0]:.3g}" in svg and "start of training" in svg

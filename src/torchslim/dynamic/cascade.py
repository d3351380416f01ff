"""Cascades: a small (compressed) model answers first; inputs it is unsure of go to the large one.

A rule-based dynamic network (the large model is the fallback, as in BranchyNet's final exit):
the small model's confidence is judged with the same policies and the same calibration as the
early exits (policy.py; "patience" needs several exits and is refused here). CascadeModel runs
the large model only on the rows the small one did not keep, so its cost really falls with the
share of easy inputs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.config_base import config
from ..core.errors import ConfigError, check
from ..core.measure.latency import count_macs
from ..core.stage import StageResult, register_stage
from ..core.task import Task, load_callable
from ..core.utils import model_device
from .exits import _num
from .export import scriptable_save
from .policy import POLICIES, calibrate, evaluate_threshold, exit_mask


class CascadeModel(nn.Module):
    """small answers the rows it is confident on (policy, threshold buffers); large the rest."""

    def __init__(self, small: nn.Module, large: nn.Module, policy: int, threshold: float):
        super().__init__()
        self.small, self.large = small, large
        self.register_buffer("policy", torch.tensor(policy, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_exits(x)[0]

    @torch.jit.export
    def forward_with_exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, 0 where the small model answered, 1 where the large one did)."""
        logits = self.small(x)
        n = x.shape[0]
        empty = torch.zeros(n, dtype=torch.long, device=x.device)
        done, _, _ = exit_mask(logits, int(self.policy.item()), float(self.threshold.item()), empty, empty)
        where = (~done).to(torch.long)
        if bool(done.all()):
            return logits, where
        rest = ~done
        out = logits.clone()
        out[rest] = self.large(x[rest]).to(out.dtype)
        return out, where


@config
class CascadeConfig:
    """small: the first model (an nn.Module, or "package.module:function" returning one);
    policy: "maxprob" | "entropy"; accuracy_drop / latency_budget: as in ExitConfig (the cost
    is small + the large model's share, in MACs, as a fraction of the large model's)."""

    small: Any = None
    policy: str = "maxprob"
    accuracy_drop: float = 0.005
    latency_budget: float | None = None

    def __post_init__(self) -> None:
        check(isinstance(self.small, (nn.Module, str)), "CascadeConfig.small",
              "give the small model: an nn.Module or 'package.module:function'")
        check(self.policy in ("maxprob", "entropy"), "CascadeConfig.policy",
              f"must be 'maxprob' or 'entropy' (patience needs several exits), got {self.policy!r}")
        _num(self.accuracy_drop, "accuracy_drop", 0.0, 1.0, owner="CascadeConfig")
        self.latency_budget is None or _num(self.latency_budget, "latency_budget", 0.0, 1.0, low_open=True,
                                            owner="CascadeConfig")


@torch.no_grad()
def _logits(model: nn.Module, task: Task, split: str) -> torch.Tensor:
    out, _ = task.outputs_and_targets(model, split)
    return out


@register_stage(CascadeConfig, copy_input=False)  # cascade copies both models
def cascade(model: nn.Module, cfg: CascadeConfig, task: Task) -> StageResult:
    """model is the large one; returns a calibrated CascadeModel (copies of both)."""
    if task.val is None:
        raise ConfigError(f"CascadeConfig: task {task.name!r} has no val split; the threshold is calibrated on it")
    small = cfg.small if isinstance(cfg.small, nn.Module) else load_callable(cfg.small, what="small model")()
    check(isinstance(small, nn.Module), "CascadeConfig.small", f"{cfg.small!r} did not return an nn.Module")
    small, large = copy.deepcopy(small).to(model_device(model)).eval(), copy.deepcopy(model).eval()
    x = task.example_inputs(batch_size=1).to(model_device(large))
    c_small, c_large = count_macs(small, x), count_macs(large, x)
    cum = torch.tensor([c_small, c_small + c_large], dtype=torch.float64) / c_large
    sv, lv = _logits(small, task, "val"), _logits(large, task, "val")
    check(sv.shape == lv.shape, "CascadeConfig.small", f"outputs {tuple(sv.shape[1:])} per sample, the large model {tuple(lv.shape[1:])}")
    yv = torch.cat([y for _, y in task.split("val")])
    cal = calibrate(torch.stack([sv, lv]), yv, cfg.policy, cum, cfg.accuracy_drop, cfg.latency_budget)
    st, lt = _logits(small, task, "test"), _logits(large, task, "test")
    yt = torch.cat([y for _, y in task.split("test")])
    test = evaluate_threshold(torch.stack([st, lt]), yt, cfg.policy, cal["threshold"], cum)
    casc = CascadeModel(small, large, POLICIES[cfg.policy], cal["threshold"]).train(model.training)
    save, note = scriptable_save(casc)
    info = {"policy": cfg.policy, "threshold": cal["threshold"], "val_accuracy": cal["val_accuracy"],
            "full_val_accuracy": cal["full_val_accuracy"], "small_val_accuracy": float((sv.argmax(-1) == yv).float().mean()),
            "exit_rates": cal["exit_rates"], "expected_cost_frac": cal["mean_cost"], "budget_met": cal["budget_met"],
            "test_accuracy": test["accuracy"], "test_exit_rates": test["exit_rates"], "test_cost_frac": test["mean_cost"],
            "full_test_accuracy": float((lt.argmax(-1) == yt).float().mean()),
            "small_macs": c_small, "large_macs": c_large, "torchscript": note,
            "curve": {k: [r[k] for r in cal["curve"]] for k in ("threshold", "accuracy", "mean_cost")}}
    return StageResult(casc, info, save)

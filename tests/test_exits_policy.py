"""Exit rules without training: the batch-1 test and the calibration sweep decide exactly as the
model's loop; per-exit thresholds keep the bound; a batch nobody leaves is never regrouped."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from torchslim.dynamic.model import EarlyExitModel, ExitHead
from torchslim.dynamic.policy import (
    NEVER,
    POLICIES,
    Sweep,
    calibrate,
    exit_mask,
    exit_one,
    simulate,
    threshold_grid,
)


def _logits(seed=0, exits=3, n=2000, classes=10):
    g = torch.Generator().manual_seed(seed)
    # later heads sharper and more often right, as in a trained exit model
    y = torch.randint(0, classes, (n,), generator=g)
    out = []
    for i in range(exits + 1):
        lg = torch.randn(n, classes, generator=g)
        lg[torch.arange(n), y] += 1.0 + 1.2 * i
        out.append(lg * (1 + 0.5 * i))
    return torch.stack(out), y


def test_exit_one_is_exit_mask_at_the_float32_boundary():
    lg, _ = _logits(n=300)
    none = torch.empty(0, dtype=torch.long)
    for policy in ("maxprob", "entropy"):
        code = POLICIES[policy]
        for row in lg[0].split(1):
            conf = torch.softmax(row, -1).amax(-1) if code == 0 else None
            if code == 1:
                logp = torch.log_softmax(row, -1)
                conf = -(logp.exp() * logp).sum(-1) / torch.log(torch.tensor(10.0))
            c = float(conf)
            # the row's own score and its float32 neighbours: the comparison must agree exactly
            for t in (c, float(torch.nextafter(conf, conf + 1)), float(torch.nextafter(conf, conf - 1)), 0.5, 0.9):
                t32 = float(torch.tensor(t, dtype=torch.float64).float())
                assert exit_one(row, code, t32) == bool(exit_mask(row, code, t, none, none)[0])


def test_sweep_equals_the_models_loop_for_every_policy():
    lg, y = _logits()
    cum = torch.tensor([0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for policy in POLICIES:
        sweep = Sweep(lg, y, policy, cum)
        grid = threshold_grid(policy, 3)
        for t in grid:
            assert torch.equal(sweep.where(t), simulate(lg, policy, t))
        for _ in range(20):
            ts = [grid[int(i)] for i in torch.randint(0, len(grid), (3,), generator=g)]
            where = simulate(lg, policy, ts)
            assert torch.equal(sweep.where(ts), where)
            acc = float((lg.argmax(-1)[where, torch.arange(len(y))] == y).float().mean())
            assert sweep.evaluate(ts)["accuracy"] == acc


def test_per_exit_thresholds_keep_the_bound_and_cost_no_more():
    lg, y = _logits(seed=3)
    cum = torch.tensor([0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    for policy in ("maxprob", "entropy"):
        shared = calibrate(lg, y, policy, cum, 0.01, None)
        per = calibrate(lg, y, policy, cum, 0.01, None, per_exit=True)
        assert shared["budget_met"] and per["budget_met"]
        assert per["val_accuracy"] >= per["full_val_accuracy"] - 0.01 - 1e-9
        assert per["mean_cost"] <= shared["mean_cost"] + 1e-12
        assert len(per["thresholds"]) == 3 and shared["thresholds"] == [shared["threshold"]] * 3
        assert Sweep(lg, y, policy, cum).evaluate(per["thresholds"])["mean_cost"] == per["mean_cost"]
        budget = calibrate(lg, y, policy, cum, 0.0, 0.6, per_exit=True)
        assert budget["mean_cost"] <= 0.6 + 1e-9 and budget["val_accuracy"] >= calibrate(lg, y, policy, cum, 0.0, 0.6)["val_accuracy"]


class _CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_batch_nobody_leaves_is_not_regrouped():
    torch.manual_seed(0)
    segs = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(3)] + [torch.nn.Linear(8, 4)]
    heads = [ExitHead("channels", 8, 4) for _ in range(3)]
    ee = EarlyExitModel(segs, heads, POLICIES["maxprob"], [NEVER] * 3).eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        ref = segs[3](segs[2](segs[1](segs[0](x))))
        with _CountOps() as ops:
            out, where = ee.forward_with_exits(x)
    torch.testing.assert_close(out, ref)
    assert torch.equal(where, torch.full((16,), 3))
    assert not [n for n in ops.names if n.startswith("index_")], ops.names
    ee.thresholds.fill_(0.0)  # everyone leaves at the first head: then rows are written out
    with torch.no_grad(), _CountOps() as ops:
        out, where = ee.forward_with_exits(x)
    assert torch.equal(where, torch.zeros(16, dtype=torch.long)) and "index_copy_" in ops.names

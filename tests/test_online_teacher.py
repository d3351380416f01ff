"""Distillation from a teacher after a drift (issue 15, item 3): the teacher runs only in the
window after a detected drift (never before it, exactly ``teacher_batches`` batches after it),
and on a synthetic drifting stream with noisy labels it lifts the accuracy after the drift over
the same run without a teacher. Drop-and-grow regrowth keeps every tensor's non-zeros, and
pruned tensors learn at lr / sqrt(density)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.core.errors import ConfigError
from torchslim.online import ArrayStream, Concat, OnlineConfig, online
from torchslim.online.loop import param_groups
from torchslim.online.regrow import swap_by_gradient
from torchslim.pruning import attach_masks, masks_of

CLASSES, DIM, BATCH = 4, 8, 32


def _blobs(n, centers, seed, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = centers[y] + 0.6 * torch.randn(n, DIM, generator=g)
    flip = torch.rand(n, generator=g) < noise  # label noise: a flipped sample gets a random class
    y_seen = torch.where(flip, torch.randint(0, CLASSES, (n,), generator=g), y)
    return x, y_seen, y


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def _train(model, x, y, steps=300):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def world():
    g = torch.Generator().manual_seed(0)
    old, new = 2.0 * torch.randn(CLASSES, DIM, generator=g), 2.0 * torch.randn(CLASSES, DIM, generator=g)
    xa, ya, _ = _blobs(20 * BATCH, old, 1)
    xb, yb_noisy, yb = _blobs(40 * BATCH, new, 2, noise=0.4)  # after the drift: new centers, 40% noisy labels
    student = _train(_mlp(0), *_blobs(2000, old, 3)[:2])
    teacher = _train(_mlp(1), *_blobs(2000, new, 4)[:2])  # knows the new data (clean labels)
    xt, _, yt = _blobs(1000, new, 5)
    return {"a": (xa, ya), "b": (xb, yb_noisy), "b_clean": yb, "student": student, "teacher": teacher,
            "test_new": (xt, yt), "drift_batch": 20}


def _run(world, **kw):
    import copy

    model = copy.deepcopy(world["student"])
    cfg = OnlineConfig(lr=3e-3, detector="adwin", boost_lr=3.0, boost_batches=10, eval_every=4, progress=False, seed=0, **kw)
    stream = Concat(ArrayStream(*world["a"], BATCH), ArrayStream(*world["b"], BATCH))
    return model, online(model, stream, cfg, eval_sets={"new": world["test_new"]}, check_compression=False)


def test_teacher_switches_on_drift_only_and_lifts_accuracy(world):
    calls = []
    teacher = world["teacher"]
    handle = teacher.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        _, plain = _run(world)
        before_calls = len(calls)
        _, taught = _run(world, teacher=teacher, teacher_batches=20, teacher_alpha=0.9)
    finally:
        handle.remove()
    ups = [e["batch"] for e in taught.drift_events if e["direction"] == "up"]
    first = lambda r: [e for e in r.drift_events if e["batch"] <= ups[0]]
    assert first(plain) == first(taught)  # identical runs up to the drift event
    assert len(ups) == 1 and world["drift_batch"] <= ups[0] <= world["drift_batch"] + 3, taught.drift_events
    assert before_calls == 0  # a run without a teacher never calls it
    assert taught.teacher_batches == 20 and len(calls) == 20  # one teacher pass per step, only in the window
    assert plain.teacher_batches == 0
    # the teacher only changes what happens after the drift: the curves agree up to the event
    assert [p["acc"] for p in plain.curve[: ups[0] + 1]] == [p["acc"] for p in taught.curve[: ups[0] + 1]]
    # accuracy on clean held-out data of the new distribution, over the window after the drift
    window = lambda r: [e["new"] for e in r.segment_eval if ups[0] < e["batch"] <= ups[0] + 20]
    after = lambda r: sum(window(r)) / len(window(r))
    # measured here: 0.43 with the teacher vs 0.36 without (40% of the labels are noise); a
    # 5 pt margin: float differences between AVX2 and AVX-512 kernels move these by << 1 pt
    assert after(taught) > after(plain) + 0.05, (after(taught), after(plain))
    assert taught.segment_eval[-1]["new"] >= plain.segment_eval[-1]["new"] - 0.01


def test_teacher_config_is_checked():
    with pytest.raises(ConfigError, match="OnlineConfig.teacher"):
        OnlineConfig(teacher=3)
    with pytest.raises(ConfigError, match="OnlineConfig.teacher_alpha"):
        OnlineConfig(teacher_alpha=1.5)
    assert OnlineConfig(teacher=_mlp(0)).to_dict()["teacher"] == "Sequential"  # run.json stays JSON


def test_drop_and_grow_keeps_nonzeros_per_tensor(world):
    model = _mlp(0)
    g = torch.Generator().manual_seed(0)
    masks = {"0.weight": torch.rand(32, DIM, generator=g) < 0.25, "2.weight": torch.rand(CLASSES, 32, generator=g) < 0.25}
    attach_masks(model, masks)
    before = {n: m.clone() for n, m in masks_of(model).items()}
    x, y = world["b"]
    moved = swap_by_gradient(model, [(x[:64], y[:64])], nn.functional.cross_entropy, 0.3)
    after = masks_of(model)
    assert moved == sum(int(0.3 * int(m.sum())) for m in before.values()) > 0
    for n, m in before.items():
        assert int(after[n].sum()) == int(m.sum())  # same non-zeros per tensor
        assert int((after[n] & ~m).sum()) == int(0.3 * int(m.sum()))  # that many moved
        w = model.get_parameter(n)
        assert bool((w[~after[n]] == 0).all())


def test_pruned_tensors_learn_at_lr_over_sqrt_density():
    model = _mlp(0)
    keep = torch.zeros(32, DIM, dtype=torch.bool)
    keep[:, :2] = True  # density 0.25
    attach_masks(model, {"0.weight": keep})
    groups = param_groups(model, OnlineConfig(lr=1e-3))
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lrs[id(model[0].weight)] == pytest.approx(2e-3)  # 1e-3 * (1 / 0.25) ** 0.5
    assert lrs[id(model[0].bias)] == lrs[id(model[2].weight)] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in groups) == 4
    plain = param_groups(model, OnlineConfig(lr=1e-3, sparse_lr_power=0.0))
    assert len(plain) == 1 and plain[0]["lr"] == 1e-3


def test_teacher_window_survives_a_resume(world, tmp_path):
    """Stopped inside the teacher's window and resumed, the run ends as the uninterrupted one."""
    import copy

    stream = Concat(ArrayStream(*world["a"], BATCH), ArrayStream(*world["b"], BATCH))
    kw = {"lr": 3e-3, "boost_lr": 3.0, "boost_batches": 10, "teacher": world["teacher"], "teacher_batches": 20,
          "checkpoint_every": 5, "progress": False, "seed": 0}
    whole = copy.deepcopy(world["student"])
    ref = online(whole, stream, OnlineConfig(**kw), check_compression=False)
    part = copy.deepcopy(world["student"])
    online(part, stream, OnlineConfig(**kw, max_batches=25), checkpoint_dir=tmp_path, check_compression=False)
    fresh = copy.deepcopy(world["student"])  # a new process: the model as it was, state from the file
    res = online(fresh, stream, OnlineConfig(**kw), checkpoint_dir=tmp_path, resume=True, check_compression=False)
    ups = [e["batch"] for e in ref.drift_events if e["direction"] == "up"]
    assert len(ups) == 1 and ups[0] < 25 < ups[0] + 20  # the stop falls inside the window
    assert res.resumed_from == 25 and res.teacher_batches == ref.teacher_batches == 20
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)

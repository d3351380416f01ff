import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchslim.core.errors import ConfigError
from torchslim.core.train import TrainConfig, fit, penalty
from torchslim.export.weights import read_state_dict
from torchslim.zoo import build_model, build_task

WORKER = Path(__file__).with_name("train_worker.py")


@pytest.fixture(scope="module")
def digits():
    return build_task("digits", batch_size=64)


def _run_worker(ckpt, out, resume, slow="0"):
    env = {**os.environ, "SLOW_STEP_S": slow}
    return subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out), resume], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_to_identical_weights(tmp_path):
    ref = _run_worker(tmp_path / "ref_ckpt", tmp_path / "ref.safetensors", "0")
    assert ref.wait(timeout=240) == 0, ref.stdout.read()

    ckpt = tmp_path / "ckpt"
    victim = _run_worker(ckpt, tmp_path / "victim.safetensors", "0", slow="0.01")
    deadline = time.time() + 240
    last = ckpt / "train_last.pt"
    # kill once at least two epochs are checkpointed, i.e. mid-way through the 6-epoch run
    while time.time() < deadline:
        if last.exists() and torch.load(last, weights_only=True)["state"]["epoch"] >= 2:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim.safetensors").exists()
    epoch_at_kill = torch.load(last, weights_only=True)["state"]["epoch"]
    assert 2 <= epoch_at_kill < 6

    resumed = _run_worker(ckpt, tmp_path / "resumed.safetensors", "1")
    out = resumed.stdout.read()
    assert resumed.wait(timeout=240) == 0, out
    assert f"resumed_from {epoch_at_kill}" in out
    a, b = read_state_dict(tmp_path / "ref.safetensors"), read_state_dict(tmp_path / "resumed.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "opt,kw,sched,skw",
    [
        ("SGD", {"momentum": 0.9}, None, {}),
        ("Adagrad", {}, "ExponentialLR", {"gamma": 0.9}),
        ("RMSprop", {}, "StepLR", {"step_size": 1}),
        ("Adam", {}, "CosineAnnealingLR", {}),
        ("AdamW", {"weight_decay": 0.01}, "ReduceLROnPlateau", {"patience": 1}),
    ],
)
def test_optimizers_and_schedules_by_torch_name_learn(digits, opt, kw, sched, skw):
    torch.manual_seed(0)
    model = build_model("lenet300", digits)
    before = digits.evaluate(model, "val")
    lr = 0.05 if opt in ("SGD", "Adagrad") else 1e-3
    res = fit(model, digits, TrainConfig(epochs=3, lr=lr, optimizer=opt, optimizer_kwargs=kw,
                                         scheduler=sched, scheduler_kwargs=skw, device="cpu"))
    assert res.epochs_run == 3 and len(res.history) == 3
    # digits is easy: three epochs of any of these takes a random net (~10%) above 85%
    assert before < 0.3 and digits.evaluate(model, "val") > 0.85


def test_scheduler_changes_lr_as_torch_says(digits):
    cfg = TrainConfig(epochs=3, lr=0.1, optimizer="SGD", scheduler="StepLR",
                      scheduler_kwargs={"step_size": 1, "gamma": 0.5}, device="cpu")
    res = fit(build_model("mlp", digits), digits, cfg)
    # StepLR(step_size=1, gamma=0.5) stepped once per epoch: the LR used in epoch e is 0.1 * 0.5**e
    assert [h["lr"] for h in res.history] == pytest.approx([0.1, 0.05, 0.025])


def test_l1_l2_penalty_closed_form():
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    # biases are not penalised
    assert float(penalty(lin, 0.1, 0.0).detach()) == pytest.approx(0.1 * 7.5)
    assert float(penalty(lin, 0.0, 0.01).detach()) == pytest.approx(0.01 * (1 + 4 + 0.25 + 9 + 1))


def test_l1_training_drives_weights_towards_zero(digits):
    torch.manual_seed(0)
    plain, sparse = build_model("lenet300", digits), build_model("lenet300", digits)
    sparse.load_state_dict(plain.state_dict())
    fit(plain, digits, TrainConfig(epochs=3, device="cpu"))
    fit(sparse, digits, TrainConfig(epochs=3, l1=1e-4, device="cpu"))
    small = lambda m: sum((p.abs() < 1e-3).sum().item() for p in m.parameters() if p.dim() > 1)
    assert small(sparse) > 2 * small(plain)


def test_hooks_extra_loss_and_after_step_are_called(digits):
    calls = {"loss": 0, "step": []}

    class Hook:
        def extra_loss(self, model, inputs, outputs, targets):
            calls["loss"] += 1
            return outputs.sum() * 0.0

        def after_step(self, model, step):
            calls["step"].append(step)

    fit(build_model("mlp", digits), digits, TrainConfig(epochs=1, max_steps=5, device="cpu"), hooks=[Hook()])
    assert calls["loss"] == 5 and calls["step"] == [1, 2, 3, 4, 5]


def test_early_stopping_restores_best_val(digits):
    torch.manual_seed(0)
    model = build_model("lenet300", digits)
    # a huge LR makes val accuracy collapse after the first epochs; patience 2 stops the run
    res = fit(model, digits, TrainConfig(epochs=30, lr=0.5, optimizer="SGD", early_stopping_patience=2, device="cpu"))
    assert res.stopped_early and res.epochs_run < 30
    assert digits.evaluate(model, "val") == pytest.approx(res.best_val)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"lr": -1}, "TrainConfig.lr"), ({"optimizer": "Adamm"}, "TrainConfig.optimizer"),
     ({"scheduler": "Cosine"}, "TrainConfig.scheduler"), ({"epochs": -2}, "TrainConfig.epochs"),
     ({"resume": True}, "TrainConfig.resume"), ({"l1": -0.1}, "TrainConfig.l1")],
)
def test_bad_train_config_is_one_line_error(kwargs, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg

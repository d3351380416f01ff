"""Progress bars: auto mode (on in a terminal, off in a pipe, under pytest, with
TORCHSLIM_PROGRESS=0), rank 0 only, and what the bars of training, calibration and the pruning
schedules say."""

import io
import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from torchslim.core import progress
from torchslim.core.stage import apply_stage
from torchslim.core.train import TrainConfig, fit
from torchslim.pruning import PruneConfig
from torchslim.quantization import QuantConfig
from torchslim.zoo import build_model, build_task


@pytest.fixture(scope="module")
def digits():
    return build_task("digits")


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=160)


def test_auto_mode_follows_the_terminal_the_env_and_the_rank(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    pipe = Console(file=io.StringIO())
    assert not pipe.is_terminal and progress.enabled(None, pipe) is False
    assert progress.enabled(None, _terminal()) is True
    assert progress.enabled(None) is False  # under pytest, without a console asked for
    monkeypatch.setenv(progress.ENV, "0")
    assert progress.enabled(None, _terminal()) is False
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.enabled(None, pipe) is True
    assert progress.enabled(False, _terminal()) is False  # an explicit setting wins
    monkeypatch.delenv(progress.ENV)
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())  # a search worker
    assert progress.enabled(None, _terminal()) is False and progress.enabled(True, _terminal()) is True
    monkeypatch.setenv("RANK", "1")  # a torchrun rank other than 0 never draws
    assert progress.enabled(True, _terminal()) is False


_CHILD = """
import sys
from torchslim.core import progress
from torchslim.core.train import TrainConfig, fit
from torchslim.zoo import build_model, build_task
print("auto:", progress.enabled(), flush=True)
task = build_task("digits")
with progress.stage("stage 1/1 train"):
    fit(build_model("lenet300", task), task, TrainConfig(epochs=2, max_steps=45, device="cpu"))
"""


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", progress.ENV, "RANK")}
    return {**env, "TERM": "xterm-256color", "OMP_NUM_THREADS": "1", "COLUMNS": "150"}


@pytest.mark.slow  # a child process that imports torch
def test_a_real_pseudo_terminal_gets_bars():
    pty = pytest.importorskip("pty")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=follower, stdout=follower, stderr=follower,
                            env=_child_env(), close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    seen = b"".join(chunks).decode(errors="replace")
    assert "auto: True" in seen
    assert "stage 1/1 train · training" in seen and "/45" in seen


def test_auto_mode_is_off_when_stdout_is_a_pipe_or_file(monkeypatch, digits):
    for name in ("PYTEST_CURRENT_TEST", progress.ENV, "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    out = io.StringIO()  # what stdout is when redirected: not a terminal
    monkeypatch.setattr(sys, "stdout", out)
    assert progress.enabled() is False
    with progress.recording() as seen:
        fit(build_model("lenet300", digits), digits, TrainConfig(epochs=1, max_steps=3, device="cpu"))
    assert seen == [] and out.getvalue() == ""


class _Snapshot:
    """fit hook: what the open bars say after every step."""

    def __init__(self):
        self.seen = []

    def after_step(self, model, step):
        self.seen.append(progress.open_bars())


def test_training_bar_shows_stage_epoch_loss_and_metric(digits):
    torch.manual_seed(0)
    model = build_model("lenet300", digits)
    snap = _Snapshot()
    with progress.use_console(_terminal()) as con, progress.stage("stage 2/3 prune"):
        result = fit(model, digits, TrainConfig(epochs=2, lr=3e-3, device="cpu"), hooks=[snap])
    first = result.history[0]
    # in epoch 2 the bar shows epoch 1's mean loss and val metric, as fit recorded them
    want = (f"stage 2/3 prune · training epoch 2/2 · loss {first['train_loss']:.4g} · "
            f"val accuracy {first['val_metric']:.4g}")
    texts = [bars[-1] for bars in snap.seen if bars]
    assert want in texts, texts[-3:]
    assert texts[0] == "stage 2/3 prune · training" and "epoch 1/2" in texts[1]
    assert "stage 2/3 prune · training" in con.file.getvalue()
    assert progress.open_bars() == []  # closed when fit returns
    snap.seen.clear()
    with progress.use_console(_terminal()):
        fit(model, digits, TrainConfig(epochs=1, max_steps=3, progress=False, device="cpu"), hooks=[snap])
    assert snap.seen == [[], [], []]


def test_bars_are_off_by_default_under_pytest(digits):
    with progress.recording() as seen:
        fit(build_model("lenet300", digits), digits, TrainConfig(epochs=1, max_steps=3, device="cpu"))
    assert seen == []


def test_calibration_and_pruning_schedules_show_progress(digits):
    torch.manual_seed(0)
    model = build_model("lenet300", digits)
    fit(model, digits, TrainConfig(epochs=1, max_steps=20, device="cpu"))
    with progress.use_console(_terminal()), progress.recording() as seen:
        with progress.stage("stage 1/3 quantize"):
            apply_stage(model, QuantConfig(bits=8), digits)
        with progress.stage("stage 2/3 prune"):
            gradual = apply_stage(model, PruneConfig(sparsity=0.8, schedule="gradual", finetune=TrainConfig(
                epochs=1, max_steps=40, device="cpu")), digits)
        with progress.stage("stage 3/3 prune"):
            apply_stage(model, PruneConfig(sparsity=0.5, schedule="iterative", iterations=3, finetune=TrainConfig(
                epochs=1, max_steps=6, device="cpu")), digits)
    assert "stage 1/3 quantize · calibration batches" in seen
    # every gradual update of the cubic schedule is shown on the training bar, with its sparsity
    log = gradual.info["schedule_log"]
    updates = [t for t in seen if t.startswith("stage 2/3 prune · training") and "pruning update" in t]
    shown = {t.split("sparsity ")[1].split("%")[0] for t in updates}
    assert {f"{p['sparsity'] * 100:.0f}" for p in log[:-1]} <= shown and len(log) > 3
    assert "stage 3/3 prune · pruning rounds" in seen
    assert any(t.startswith("stage 3/3 prune · training") for t in seen)  # each round's fine-tune


def test_a_stage_that_raises_leaves_no_bar_running(digits):
    model = build_model("lenet300", digits)
    with progress.use_console(_terminal()):
        with pytest.raises(FloatingPointError), progress.stage("stage 1/1 train"):
            with torch.no_grad():
                model.net[1].weight.fill_(float("nan"))  # fit stops at the first step: a non-finite loss
            fit(model, digits, TrainConfig(epochs=1, device="cpu"))
        assert progress.open_bars() == []
        with progress.bar("next", 2) as b:  # a fresh display, not the stale one
            b.advance(1)
            assert progress.open_bars() == ["next"]
    assert progress.open_bars() == []

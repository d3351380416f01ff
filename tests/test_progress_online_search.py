"""Long work visible (issue 11, item 7) for online learning, policy search and weight sharing:
their bars go through ``torchslim.core.progress`` and say the numbers the runs return; with the
auto rule and no terminal nothing is printed; worker processes draw none."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import sys

import pytest
import torch
import yaml
from rich.console import Console

from torchslim.core import progress
from torchslim.online import ArrayStream, Concat, GeneratorStream, OnlineConfig, online
from torchslim.search.trials import TrialBar
from torchslim.sharing import ShareConfig
from torchslim.sharing import apply as share
from torchslim.zoo import build_model, build_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=200)


@pytest.fixture
def steps(monkeypatch):
    """Every Bar.advance call as (bar label, n): the steps a bar took."""
    seen: list[tuple[str, int]] = []
    original = progress.Bar.advance

    def advance(self, n=1, **fields):
        seen.append((self.label, n))
        original(self, n, **fields)

    monkeypatch.setattr(progress.Bar, "advance", advance)
    return seen


@pytest.fixture(scope="module")
def digits():
    task = build_task("digits", batch_size=64)
    xs, ys = zip(*task.train)
    return task, torch.cat(xs), torch.cat(ys)


def _drifting(x, y, batch=32):
    """The train split, then the same inputs with their labels permuted: a real drift."""
    perm = torch.tensor([3, 7, 1, 9, 0, 2, 8, 4, 6, 5])
    return Concat(ArrayStream(x, y, batch), ArrayStream(x, perm[y], batch))


def test_online_bar_carries_rate_accuracy_and_drift_count(digits, steps):
    task, x, y = digits
    torch.manual_seed(0)
    model = build_model("mlp", task, hidden=(64,))
    stream = _drifting(x, y)
    total = len(stream.streams[0]) + len(stream.streams[1])
    with progress.use_console(_terminal()) as con, progress.recording() as seen:
        r = online(model, stream, OnlineConfig(lr=3e-3, detector="adwin", progress="auto"),
                   loss=task.loss, check_compression=False)
    texts = [t for t in seen if t.startswith("online learning")]
    last = texts[-1]
    assert r.batches == total and len(r.drift_events) >= 1  # the permuted labels are found
    assert f"samples/s {r.samples_per_s:,.0f}" in last
    assert f"prequential acc {r.prequential_accuracy:.4f}" in last
    assert f"drift events {len(r.drift_events)}" in last
    for e in r.drift_events:  # each drift event was the bar's note when it happened
        note = f"drift ({e['direction']}) at batch {e['batch']}: error {e['error_before']:.3f} -> {e['error_after']:.3f}"
        assert any(t.endswith(note) for t in texts), note
    # one step per batch, on a bar as long as the stream (its length is known)
    assert [n for label, n in steps if label == "online learning"] == [1] * total
    assert f"{total}/{total}" in con.file.getvalue()
    # the accuracy shown after the first segment's last batch is the curve's, sample-weighted
    first = len(stream.streams[0])
    n_first = sum(p["n"] for p in r.curve[:first])
    acc_first = sum(p["acc"] * p["n"] for p in r.curve[:first]) / n_first
    assert any(f"prequential acc {acc_first:.4f}" in t for t in texts)
    assert progress.open_bars() == []


def test_online_bar_without_a_known_length_is_open_ended(digits, steps):
    task, x, y = digits
    torch.manual_seed(0)
    model = build_model("mlp", task, hidden=(32,))
    stream = GeneratorStream(lambda: ((x[i:i + 16], y[i:i + 16]) for i in range(0, 160, 16)))
    with progress.use_console(_terminal()) as con:
        r = online(model, stream, OnlineConfig(detector=None, progress=True), loss=task.loss, check_compression=False)
    assert r.batches == 10 and [n for label, n in steps if label == "online learning"] == [1] * 10
    assert "10/?" in con.file.getvalue()  # no total: rich's count without one
    steps.clear()
    with progress.use_console(_terminal()), progress.recording() as seen:
        online(model, ArrayStream(x[:64], y[:64], 16), OnlineConfig(detector=None, progress=False),
               loss=task.loss, check_compression=False)
    assert seen == [] and steps == []  # progress: false draws nothing


def _search_recipe(tmp_path):
    src = {"task": {"name": "mnist1d", "kwargs": {"num_samples": 1200}},
           "model": {"name": "rescnn1d", "kwargs": {"width": 8}}, "seed": 0, "train": {"epochs": 1},
           "measure": {"batch_size": 16, "threads": 1},
           "search": {"budget": {"macs": "0.6x"}, "method": "random", "trials": 3, "step": 2,
                      "finetune": {"max_steps": 2, "epochs": 1}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(src))
    return path


def test_search_bar_one_step_per_trial_best_so_far_equals_the_answer(tmp_path, monkeypatch, steps):
    from torchslim.app.search import run_search

    monkeypatch.setenv(progress.ENV, "1")  # forced on, as a terminal would have it
    out = tmp_path / "out"
    with progress.use_console(_terminal()), progress.recording() as seen:
        assert run_search(_search_recipe(tmp_path), out, log=lambda s: None) == 0
    summary = json.loads((out / "search.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    shown = [t for t in seen if t.startswith("search trials trial")]
    assert [re.search(r"trial (\d+/\d+)", t).group(1) for t in shown] == ["1/3", "2/3", "3/3"]
    assert [n for label, n in steps if label == "search trials"] == [1, 1, 1]
    held = sum(t["feasible"] for t in trials)
    assert shown[-1] == f"search trials trial 3/3 · best val {summary['best']['val']:.4f} · budget held {held}/3"
    # the best so far after each trial is the best of the trials up to it
    for k, text in enumerate(shown, 1):
        top = max(t["val"] for t in trials[:k] if t["feasible"])
        assert f"best val {top:.4f}" in text
    # each trial's fine-tune shows its own bar inside the trials bar
    assert any(t.startswith("training") for t in seen)


def test_sharing_bar_one_step_per_layer_named(digits, steps):
    task, *_ = digits
    torch.manual_seed(0)
    model = build_model("lenet300", task)
    with progress.use_console(_terminal()) as con, progress.recording() as seen:
        res = share(model, ShareConfig(bits=2))
    layers = list(res.info["layers"])
    assert len(layers) == 3
    for name in layers:
        assert f"weight sharing (k-means) layer {name} · bits 2" in seen
    assert [n for label, n in steps if label == "weight sharing (k-means)"] == [1, 1, 1]
    assert "3/3" in con.file.getvalue()


def test_auto_without_a_terminal_prints_nothing(digits, monkeypatch, capfd):
    task, x, y = digits
    for name in ("PYTEST_CURRENT_TEST", progress.ENV, "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    out = io.StringIO()  # what stdout is when redirected: not a terminal
    monkeypatch.setattr(sys, "stdout", out)
    assert progress.enabled() is False
    torch.manual_seed(0)
    model = build_model("mlp", task, hidden=(32,))
    with progress.recording() as seen:
        online(model, _drifting(x[:256], y[:256]), OnlineConfig(progress="auto"), loss=task.loss, check_compression=False)
        online(model, ArrayStream(x[:64], y[:64], 16), OnlineConfig(progress=None), loss=task.loss, check_compression=False)
        share(build_model("lenet300", task), ShareConfig(bits=2))
        with TrialBar(2) as bar:
            bar.add({"val": 0.5, "macs_ratio": 0.5, "index": 0, "feasible": True})
            assert not bar.on
    assert seen == [] and out.getvalue() == ""
    assert capfd.readouterr().out == ""


def test_search_worker_processes_draw_no_bar_even_when_forced(monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.enabled() is True
    # a real worker of a spawn pool, as a parallel search starts them: it inherits the
    # environment (TORCHSLIM_PROGRESS=1) and still draws nothing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(progress.enabled) is False
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    assert progress.enabled() is False and not TrialBar(3).on
    assert progress.enabled(True) is True  # an explicit setting still wins

"""The output folder and its state (issue 12, point 3): one writer, resume checks the recipe,
a used folder is cleaned, stray temp files swept, artifact names unique."""

import copy
import json
import os

import pytest

from torchslim.app.run_state import RunStateError, folder_lock
from torchslim.app.runner import run_recipe
from torchslim.core.errors import TorchslimError

RECIPE = {
    "name": "state-test",
    "task": {"name": "digits", "kwargs": {"batch_size": 64}},
    "model": "lenet300",
    "seed": 1,
    "stages": [
        {"prune": {"sparsity": 0.5}, "name": "a/b"},
        {"prune": {"sparsity": 0.7}, "name": "a_b"},
    ],
    "measure": {"batch_size": 16, "repeats": 2},
}
STABLE = ("stage", "metric", "params", "nonzeros", "bytes")


def _quiet(*_):
    pass


def _stable(rows):
    return [{k: r[k] for k in STABLE} for r in rows]


def test_a_second_run_on_the_same_folder_refuses(tmp_path):
    with folder_lock(tmp_path / "out"), pytest.raises(RunStateError, match="in use by another torchslim run"):
        run_recipe(copy.deepcopy(RECIPE), out=tmp_path / "out", log=_quiet)


def test_resume_reruns_a_changed_stage_and_refuses_a_changed_baseline(tmp_path):
    out = tmp_path / "out"
    first = run_recipe(copy.deepcopy(RECIPE), out=out, log=_quiet)
    # artifact names unique although "a/b" and "a_b" slug alike
    arts = [r["artifact"] for r in first["rows"]]
    assert len(set(arts)) == 3 and all((out / a).exists() for a in arts)
    changed = copy.deepcopy(RECIPE)
    changed["stages"][1]["prune"]["sparsity"] = 0.9
    logs = []
    second = run_recipe(changed, out=out, resume=True, log=logs.append)
    assert "resuming after stage 1 of 2" in logs
    assert _stable(second["rows"][:2]) == _stable(first["rows"][:2])  # stage 1 kept
    assert second["rows"][2]["nonzeros"] < first["rows"][2]["nonzeros"]  # stage 2 re-ran at 0.9
    fresh = run_recipe(copy.deepcopy(changed), out=tmp_path / "fresh", log=_quiet)
    assert _stable(fresh["rows"]) == _stable(second["rows"])  # the same as running it from scratch
    other = copy.deepcopy(changed)
    other["seed"] = 2
    with pytest.raises(TorchslimError, match="seed, train or measure changed"):
        run_recipe(other, out=out, resume=True, log=_quiet)


def test_fresh_run_cleans_the_folder_and_sweeps_temp_files(tmp_path):
    out = tmp_path / "out"
    (out / "artifacts").mkdir(parents=True)
    (out / "model.tsla").write_bytes(b"stale")
    (out / "artifacts" / "old.bin").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")  # not torchslim's: left alone
    (out / ".run.json.abc123.tmp").write_text("half")
    one = copy.deepcopy(RECIPE)
    one["stages"] = one["stages"][:1]
    logs = []
    run_recipe(one, out=out, log=logs.append)
    assert not (out / "model.tsla").exists() and not (out / "artifacts" / "old.bin").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.rglob("*.tmp"))
    assert any("temp file" in m for m in logs) and any("cleaned" in m for m in logs)
    assert json.loads((out / "run.json").read_text())["rows"][-1]["stage"] == "a/b"
    mask = os.umask(0)
    os.umask(mask)
    for f in ("run.json", "model.tsla") if (out / "model.tsla").exists() else ("run.json",):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~mask  # the user's umask, not 0600


def test_guard_flags_a_collapse_and_can_stop_the_run(tmp_path):
    """Guards are on by default (issue 10, point 5): a stage that loses more than guard.max_drop
    (0.02) is flagged in run.json and the table; guard.error stops the run; an untrained zoo
    model is flagged at the baseline."""
    from torchslim.app.runner import GuardError
    from torchslim.core.measure import Record, format_records

    trained = copy.deepcopy(RECIPE)
    trained["train"] = {"epochs": 3, "lr": 0.003, "device": "cpu"}
    trained["stages"] = [{"prune": {"sparsity": 0.995}, "name": "collapse"}]
    run = run_recipe(trained, out=tmp_path / "a", log=_quiet)
    base, row = run["rows"]
    assert base["metric"] - row["metric"] > 0.02
    assert base["flags"] == [] and "more than guard.max_drop 0.02" in row["flags"][0]
    from rich.console import Console

    con = Console(record=True, width=250)
    con.print(format_records([Record.from_dict(r) for r in run["rows"]]))
    assert "⚑ collapse: accuracy dropped" in con.export_text()
    trained["guard"] = {"max_drop": 0.05, "error": True}
    with pytest.raises(GuardError, match="stage 'collapse'"):
        run_recipe(trained, out=tmp_path / "b", log=_quiet)
    untrained = copy.deepcopy(RECIPE)
    untrained["stages"] = untrained["stages"][:1]
    run = run_recipe(untrained, out=tmp_path / "c", log=_quiet)
    assert "neither trained" in run["rows"][0]["flags"][0]
    with pytest.raises(TorchslimError, match="guard.max_drop"):
        run_recipe({**untrained, "guard": {"max_drop": 2}}, out=tmp_path / "d", log=_quiet)

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from torchslim.app.runner import run_recipe

RECIPE = {
    "name": "kill-test",
    "task": {"name": "digits", "kwargs": {"batch_size": 32}},
    "model": "lenet300",
    "seed": 4,
    "train": {"epochs": 3, "lr": 0.001, "device": "cpu"},
    "stages": [
        {"lowrank": {"params_keep": 0.5, "min_saved_macs": 0}},
        {"train": {"epochs": 25, "lr": 0.001, "device": "cpu"}, "name": "long-finetune"},
        {"train": {"epochs": 1, "lr": 0.0005, "device": "cpu"}},
    ],
    "export": ["safetensors"],
    "measure": {"batch_size": 16, "repeats": 2},
}
STABLE = ("stage", "metric", "params", "nonzeros", "bytes", "macs_per_sample")


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torchslim.app.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _stable(run):
    return [{k: r[k] for k in STABLE} for r in run["rows"]]


@pytest.mark.slow
def test_sigkill_in_second_stage_then_resume_matches_uninterrupted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    ref = _cli(["run", str(recipe), "--out", str(tmp_path / "ref"), "--no-report"])
    assert ref.wait(timeout=400) == 0, ref.stdout.read()

    out = tmp_path / "victim"
    victim = _cli(["run", str(recipe), "--out", str(out), "--no-report"])
    state = out / ".state" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if state.exists() and json.loads(state.read_text())["done"] == 1:
            break
        time.sleep(0.02)
    time.sleep(0.5)  # well inside the 25-epoch second stage
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert json.loads(state.read_text())["done"] == 1, "the kill did not land in the second stage"
    assert not (out / "run.json").exists()

    resumed = _cli(["run", str(recipe), "--out", str(out), "--resume", "--no-report"])
    text = resumed.stdout.read()
    assert resumed.wait(timeout=400) == 0, text
    assert "resuming after stage 1 of 3" in text
    a = json.loads((tmp_path / "ref" / "run.json").read_text())
    b = json.loads((out / "run.json").read_text())
    assert _stable(a) == _stable(b)
    assert len(b["rows"]) == 4
    # whatever temp file the kill left mid-write was swept, and the artifacts are the same bytes
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    for ra, rb in zip(a["rows"], b["rows"]):
        assert (tmp_path / "ref" / ra["artifact"]).read_bytes() == (out / rb["artifact"]).read_bytes(), ra["artifact"]


def test_run_writes_rows_artifacts_and_exports(tmp_path):
    recipe = {**RECIPE, "stages": [{"lowrank": {"params_keep": 0.5, "min_saved_macs": 0}}], "train": {"epochs": 1, "device": "cpu"}}
    summary = run_recipe(recipe, out=tmp_path, log=lambda m: None)
    rows = summary["rows"]
    assert [r["stage"] for r in rows] == ["baseline", "lowrank"]
    assert rows[1]["params"] < rows[0]["params"]
    for r in rows:
        assert (tmp_path / r["artifact"]).stat().st_size == r["bytes"]
    assert (tmp_path / "model.safetensors").exists()
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["seed"] == 4
    assert saved["stages"][0]["technique"] == "lowrank" and saved["versions"]["torch"]

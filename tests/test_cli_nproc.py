"""`torchslim run --nproc 2` launches the same run under torchrun (issue 16): one run.json and
one set of artifacts, written by rank 0, with the metrics of the 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from torchslim.app import cli

RECIPE = {"name": "nproc", "task": {"name": "digits", "kwargs": {"batch_size": 64}}, "model": "lenet300", "seed": 0,
          "train": {"epochs": 2, "lr": 0.003, "device": "cpu"},
          "stages": [{"prune": {"sparsity": 0.5, "finetune": {"epochs": 1, "lr": 0.001, "device": "cpu"}}}],
          "export": ["safetensors"], "measure": {"batch_size": 32, "threads": 1, "repeats": 2}}


@pytest.mark.slow
def test_run_nproc_2_matches_one_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "one"), "--no-report"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torchslim", "run", str(recipe), "--out", str(tmp_path / "two"),
                           "--no-report", "--nproc", "2"], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert [r["stage"] for r in two["rows"]] == ["baseline", "prune"]
    for a, b in zip(one["rows"], two["rows"]):  # the same global batches, split over 2 ranks
        assert abs(a["metric"] - b["metric"]) <= 0.01 and a["nonzeros"] == b["nonzeros"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "ddp x2" in json.dumps(two["rows"][1].get("info", {}))

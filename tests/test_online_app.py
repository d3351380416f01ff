"""`torchslim online recipe.yaml` (issue 15, point 6): a recipe with a `stream` block compresses,
learns online, and writes run.json with the prequential curve and drift points; bad stream
blocks are one line and exit code 2 before any work."""

from __future__ import annotations

import json

import pytest
import yaml

from torchslim.app.online import read_online_recipe, run_online_recipe

PERM = [3, 7, 1, 9, 0, 2, 8, 4, 6, 5]
RECIPE = {
    "task": {"name": "digits", "kwargs": {"batch_size": 64}},
    "model": "lenet300", "seed": 0,
    "train": {"epochs": 4, "lr": 0.003},
    "stages": [{"prune": {"sparsity": 0.8, "scope": "layer"}}],
    "measure": {"batch_size": 64, "threads": 1, "repeats": 1},
    "stream": {"batch_size": 32, "segments": [{"source": "task", "split": "val"},
                                              {"source": "task", "split": "train", "permute_labels": PERM}]},
    "eval": {"old": {"source": "task", "split": "test"}},
    "online": {"lr": 0.01, "checkpoint_every": 10, "eval_every": 10, "progress": False,
               "teacher": "baseline", "teacher_batches": 10},  # distill from the uncompressed model after a drift
}


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_online_recipe_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_online_recipe(_write(tmp_path, RECIPE), out, log=lambda m: None) == 0
    run = json.loads((out / "run.json").read_text())
    o = run["online"]
    assert o["batches"] == 12 + 34 and o["samples"] == 359 + 1078  # val then train, batch 32
    assert [p["batch"] for p in o["curve"]] == list(range(46))
    assert o["compression_unchanged"] is True
    assert any(e["direction"] == "up" and 11 <= e["batch"] <= 16 for e in o["drift_events"])  # drift at batch 12
    assert o["segment_eval"][-1]["batch"] == 46 and "old" in o["segment_eval"][-1]
    assert (out / "model.safetensors").is_file() and (out / ".state" / "online" / "online.pt").is_file()
    ups = [e for e in o["drift_events"] if e["direction"] == "up"]
    assert 10 <= o["teacher_batches"] <= 10 * len(ups)  # the teacher's window after each drift, only there
    assert run["online_config"]["teacher"] == "MLP"  # named in run.json, not serialized
    # resuming a finished run learns nothing new and changes nothing
    assert run_online_recipe(_write(tmp_path, RECIPE), out, resume=True, log=lambda m: None) == 0
    again = json.loads((out / "run.json").read_text())["online"]
    assert again["resumed_from"] == 46 and again["curve"] == o["curve"]


@pytest.mark.parametrize("patch,message", [
    ({"stream": {"segments": []}}, "stream.segments"),
    ({"stream": {"segments": [{"source": "kafka"}]}}, "stream.segments[0].source"),
    ({"stream": {"segments": [{"source": "folder"}]}}, "stream.segments[0].path"),
    ({"stream": {"segments": [{"source": "task", "permute_labels": [0, 0, 1]}]}}, "permute_labels"),
    ({"online": {"lr": -1}}, "online.lr"),
    ({"online": {"detectr": "adwin"}}, "online.detectr"),
    ({"online": {"teacher": 3}}, "online.teacher"),
    ({"online": {"teacher": {"weights": "t.safetensors"}}}, "online.teacher"),
])
def test_bad_stream_blocks_are_one_line(tmp_path, capsys, patch, message):
    data = {**RECIPE, **patch}
    assert run_online_recipe(_write(tmp_path, data), tmp_path / "out", log=lambda m: None) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out" / "compress").exists()  # refused before any work


def test_recipe_without_stream_is_refused(tmp_path):
    from torchslim.app.recipe import RecipeError

    with pytest.raises(RecipeError, match="stream"):
        read_online_recipe(_write(tmp_path, {k: v for k, v in RECIPE.items() if k != "stream"}))


@pytest.mark.slow
def test_shipped_online_recipe_runs_in_ci_size(tmp_path):
    """recipes/online_*.yaml, budgets shrunk to one epoch (as tests/test_recipes.py does for
    `torchslim run` recipes, which cannot read a `stream` block)."""
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "recipes").glob("online_*.yaml")):
        data = yaml.safe_load(path.read_text())

        def shrink(node):
            if isinstance(node, dict):
                return {k: 1 if k == "epochs" and isinstance(v, int) else shrink(v) for k, v in node.items()}
            return [shrink(v) for v in node] if isinstance(node, list) else node

        data = {**shrink(data), "measure": {"batch_size": 16, "threads": 1, "repeats": 1}}
        out = tmp_path / path.stem
        assert run_online_recipe(_write(tmp_path, data, path.name), out, log=lambda m: None) == 0
        o = json.loads((out / "run.json").read_text())["online"]
        assert o["batches"] > 0 and o["compression_unchanged"] is True and o["curve"]

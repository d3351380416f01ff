"""Every example recipe in recipes/ runs end to end in CI-sized form (budgets shrunk)."""

from pathlib import Path

import pytest
import yaml

from torchslim.app.recipe import load_recipe
from torchslim.app.runner import run_recipe

# recipes for `torchslim run`; a `search` / `stream` block belongs to `torchslim search` /
# `torchslim online` (tests/test_search.py, tests/test_online_app.py run those)
RECIPES = [p for p in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
           if not {"search", "stream"} & set(yaml.safe_load(p.read_text()) or {})]
SMALL_TASKS = {"mnist1d": {"num_samples": 1500}, "minilm": {"n_sentences": 48, "calib_sentences": 32, "val_sentences": 16}}


def shrink(node):
    """Every training budget becomes one epoch; data and measurement become tiny."""
    if isinstance(node, dict):
        return {k: (1 if k == "epochs" and isinstance(v, int) and v > 0 else shrink(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [shrink(v) for v in node]
    return node


def test_there_are_example_recipes():
    names = {p.stem for p in RECIPES}
    assert {"digits_deep_compression", "mnist1d_cnn_prune_int8", "minilm_heads_ffn_recovery", "minilm_int8"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_in_ci_size(path, tmp_path):
    data = shrink(yaml.safe_load(path.read_text()))
    task = data["task"] if isinstance(data["task"], dict) else {"name": data["task"]}
    task.setdefault("kwargs", {}).update(SMALL_TASKS.get(task["name"], {}))
    data["task"] = task
    data["measure"] = {"batch_size": 16, "threads": 1, "repeats": 1}
    recipe = load_recipe(data)
    summary = run_recipe(recipe, out=tmp_path, log=lambda m: None)
    rows = summary["rows"]
    assert [r["stage"] for r in rows] == ["baseline"] + [s.name for s in recipe.stages]
    for row in rows:
        assert row["metric"] is not None and row["bytes"] > 0 and row["params"] > 0
    for kind, file in summary["exports"].items():
        assert Path(file).stat().st_size > 0, kind

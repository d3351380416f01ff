"""Recipe files that are hostile or careless are refused in one line before any work (issue
12, point 4): size, encoding, duplicate keys, alias bombs, deep nesting."""

import pytest

from torchslim.app import cli
from torchslim.app.recipe import MAX_RECIPE_BYTES, RecipeError, load_recipe

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else 'x, x, x, x, x, x, x, x, x'}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg"))
CASES = {
    "duplicate key": ("r.yaml", "task: digits\nmodel: lenet300\nmodel: mlp\n", "line 3: duplicate key 'model'"),
    "duplicate key json": ("r.json", '{"task": "digits", "task": "x", "model": "lenet300"}', "duplicate key 'task'"),
    "alias bomb in kwargs": ("r.yaml", BOMB.replace("g: &g", "x: &g") + "task: {name: digits, kwargs: {x: *g}}\n"
                             "model: lenet300\n", "expands to more than|more than 64 YAML aliases|unknown key"),
    "deep yaml": ("r.yaml", "task: digits\nmodel: lenet300\nseed: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    "deep json": ("r.json", '{"task": "digits", "seed": ' + "[" * 3000 + "]" * 3000 + "}", "nested more than"),
    "not utf-8": ("r.yaml", b"task: digits\xff\xfe\nmodel: lenet300\n", "not UTF-8"),
    "utf-16": ("r.yaml", "task: digits\n".encode("utf-16"), "not UTF-8"),
    "too big": ("r.yaml", "task: digits\nmodel: lenet300\n#" + "x" * MAX_RECIPE_BYTES + "\n", "a recipe is at most"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_recipe_file_is_one_line(case, tmp_path, capsys):
    name, body, match = CASES[case]
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("torchslim: error: ")


def test_anchors_within_limits_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: digits\nmodel: lenet300\nstages:\n  - prune: {sparsity: 0.5}\n    finetune: &ft {epochs: 1}\n"
                    "  - prune: {sparsity: 0.6}\n    finetune: *ft\n")
    recipe = load_recipe(path)
    assert recipe.stages[0].finetune == recipe.stages[1].finetune

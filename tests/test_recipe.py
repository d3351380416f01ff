import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim.app import cli
from torchslim.app.recipe import RecipeError, load_recipe
from torchslim.core.train import TrainConfig

VALID = {
    "task": "digits",
    "model": {"name": "lenet300"},
    "seed": 1,
    "train": {"epochs": 2, "lr": 0.001},
    "stages": [{"train": {"epochs": 1}}, {"lowrank": {"params_keep": 0.5}, "finetune": {"epochs": 1}}],
    "export": ["safetensors"],
    "measure": {"batch_size": 32, "repeats": 2},
}


def test_valid_recipe_builds_typed_configs():
    r = load_recipe(VALID)
    assert isinstance(r.train, TrainConfig) and r.train.epochs == 2
    assert [s.technique for s in r.stages] == ["train", "lowrank"]
    assert isinstance(r.stages[1].finetune, TrainConfig)
    assert [s.name for s in r.stages] == ["train", "lowrank"]


def test_yaml_and_json_files_give_the_same_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(VALID))
    (tmp_path / "r.json").write_text(json.dumps(VALID))
    a, b = load_recipe(tmp_path / "r.yaml"), load_recipe(tmp_path / "r.json")
    assert a.stages[1].config == b.stages[1].config and a.train == b.train


def _with(path, value):
    data = json.loads(json.dumps(VALID))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path,value,expected",
    [
        (("stages", 0, "train", "lr"), -1, "stages[0].train.lr: must be a finite number in (0, 10], got -1"),
        (("stages", 1, "finetune", "optimizer"), "Adamm", "stages[1].finetune.optimizer: unknown torch.optim optimizer 'Adamm'"),
        (("stages", 0, "train", "epochs"), "many", "stages[0].train.epochs: must be an integer in [0, 100000], got 'many'"),
        (("stages", 0, "train", "epoch"), 3, "stages[0].train.epoch: unknown field of TrainConfig"),
        (("stages", 1), {"prunee": {}}, "stages[1].prunee: unknown technique"),
        (("measure", "batch_size"), 0, "measure.batch_size: input should be greater than or equal to 1"),
        (("export",), ["zip"], "export[0]: unknown export 'zip'"),
        (("seed",), "x", "seed: input should be a valid integer"),
        (("colour",), 1, "colour: unknown key"),
        (("train", "l1"), -0.5, "train.l1: must be a finite number in [0, 1]"),
        # upper bounds and non-finite values (issue 12): these used to hang or die in training
        (("train", "lr"), float("inf"), "train.lr: must be a finite number in (0, 10], got inf"),
        (("train", "lr"), 50.0, "train.lr: must be a finite number in (0, 10], got 50.0"),
        (("train", "l2"), 1e30, "train.l2: must be a finite number in [0, 1], got 1e+30"),
        (("train", "l2"), 2.0, "train.l2: must be a finite number in [0, 1]"),
        (("train", "epochs"), 10**9, "train.epochs: must be an integer in [0, 100000]"),
        (("train", "optimizer_kwargs"), {"eps": float("nan")}, "train.optimizer_kwargs.eps: must be finite and at most 1e12 in size, got nan"),
        (("train", "optimizer_kwargs"), {"betas2": 0.9}, "train.optimizer_kwargs.betas2: Adam takes no 'betas2'"),
        (("train", "device"), "banana", "train.device: not a torch device: 'banana'"),
        (("seed",), True, "seed: input should be a valid integer"),
        (("seed",), 2**63, "seed: input should be less than or equal to"),
        (("measure", "batch_size"), 10**9, "measure.batch_size: input should be less than or equal to 65536"),
        # the recipe format version (issue 11): missing = 1, a newer one is refused in one line
        (("schema",), 2, "schema: version 2 is newer than this torchslim reads (1)"),
        (("schema",), "1", "schema: must be a positive integer"),
        (("stages", 0, "train", "epochs"), True, "stages[0].train.epochs: must be an integer in [0, 100000], got True"),
    ],
)
def test_errors_name_the_path_inside_the_recipe(path, value, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(_with(path, value))
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_keys_and_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="^task: field required"):
        load_recipe({"model": "lenet300"})
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("task: [digits\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


# ----------------------------------------------------------------------------- fuzzing
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3))
garbage = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=6)
PATHS = [("task",), ("model",), ("seed",), ("train",), ("train", "lr"), ("train", "epochs"),
         ("train", "optimizer"), ("train", "scheduler"), ("stages",), ("stages", 0), ("stages", 0, "train"),
         ("stages", 0, "train", "lr"), ("stages", 1, "lowrank"), ("stages", 1, "lowrank", "params_keep"),
         ("stages", 1, "finetune"), ("export",), ("measure",), ("measure", "batch_size"), ("model", "name")]


@st.composite
def malformed(draw):
    """A recipe that is certainly invalid: an unknown key, an impossible value, or a wrong type."""
    kind = draw(st.sampled_from(["unknown_key", "bad_value", "not_mapping", "bad_stage", "bad_text"]))
    if kind == "unknown_key":
        path = draw(st.sampled_from([(), ("train",), ("stages", 0, "train"), ("measure",), ("model",)]))
        key = "zz_" + draw(st.text(alphabet="abcdefgh", min_size=1, max_size=6))
        data = json.loads(json.dumps(VALID))
        node = data
        for p in path:
            node = node[p]
        node[key] = draw(garbage)
        return data
    if kind == "bad_value":
        path, value = draw(st.sampled_from([
            (("train", "lr"), st.one_of(st.floats(max_value=0), st.text(min_size=1, alphabet="xyz"))),
            (("stages", 0, "train", "epochs"), st.one_of(st.integers(max_value=-1), st.text(min_size=1, alphabet="abc"))),
            (("stages", 1, "lowrank", "params_keep"), st.one_of(st.floats(min_value=1.01, max_value=1e9), st.floats(max_value=0), st.just("half"))),
            (("measure", "batch_size"), st.integers(max_value=0)),
            (("train", "optimizer"), st.text(alphabet="qwxz", min_size=1, max_size=6)),
            (("train", "scheduler"), st.text(alphabet="qwxz", min_size=1, max_size=6)),
            (("export",), st.lists(st.text(alphabet="qwz", min_size=1, max_size=4), min_size=1, max_size=2)),
            (("seed",), st.one_of(st.text(alphabet="abc", min_size=1), st.lists(st.integers(), min_size=1))),
        ]))
        return _with(path, draw(value))
    if kind == "not_mapping":
        return draw(st.one_of(st.lists(scalars, max_size=3), st.integers(), st.text(max_size=10)))
    if kind == "bad_stage":
        return _with(("stages",), draw(st.lists(st.one_of(
            st.dictionaries(st.text(alphabet="pqrst", min_size=1, max_size=5), garbage, min_size=1, max_size=2),
            scalars, st.just({}), st.just({"train": {}, "lowrank": {}})), min_size=1, max_size=3)))
    return draw(st.sampled_from(["task: [", "{\"task\": ", "- - -\n  : :", "stages: !!python/object:os.system x"]))


@settings(max_examples=520, deadline=None, suppress_health_check=list(HealthCheck))
@given(recipe=malformed())
def test_fuzz_malformed_recipes_exit_2_with_one_line(recipe, tmp_path_factory, monkeypatch, capsys):
    from torchslim.app import runner

    def must_not_run(*a, **k):
        raise AssertionError(f"malformed recipe was accepted: {recipe!r}")

    monkeypatch.setattr(runner, "run_recipe", must_not_run)
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    code = cli.main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchslim: error: "), err
    assert "Traceback" not in err

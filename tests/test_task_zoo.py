import numpy as np
import pytest
import torch

from torchslim.core.errors import TaskError
from torchslim.core.task import Task, accuracy
from torchslim.zoo import build_model, build_task


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = build_task("digits"), build_task("digits", seed=5)
    xa = torch.cat([x for x, _ in a.test])
    xb = torch.cat([x for x, _ in b.test])
    assert torch.equal(xa, xb)  # the split does not depend on the shuffling seed
    sizes = {s: sum(len(y) for _, y in a.split(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1077, "val": 360, "test": 360}  # 1797 images, 60/20/20
    counts = np.bincount(torch.cat([y for _, y in a.test]).numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    rows = lambda s: {tuple(r.tolist()) for x, _ in a.split(s) for r in x}
    assert not rows("train") & rows("test")


def test_mnist1d_generated_offline_with_configurable_size():
    t = build_task("mnist1d", num_samples=1000)
    n_train = sum(len(y) for _, y in t.train)
    n_test = sum(len(y) for _, y in t.test)
    assert n_train + sum(len(y) for _, y in t.val) == 800 and n_test == 200
    x, y = next(iter(t.test))
    assert x.shape[1] == 40 and y.max() < 10


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "rescnn1d", "mlp"])
def test_zoo_models_fit_digits_and_mnist1d(name):
    for task_name, kw in (("digits", {}), ("mnist1d", {"num_samples": 500})):
        if name == "lenet5" and task_name == "mnist1d":
            with pytest.raises(TaskError, match="square"):
                build_model(name, build_task(task_name, **kw))
            continue
        task = build_task(task_name, **kw)
        model = build_model(name, task)
        task.check_model(model)
        out = model(task.example_inputs(7))
        assert out.shape == (7, 10)


def test_lenet5_on_28x28_has_classic_shapes():
    m = build_model("lenet5", in_shape=(28 * 28,), num_classes=10)
    assert m.classifier[1].in_features == 16 * 5 * 5
    assert m(torch.zeros(2, 784)).shape == (2, 10)


def test_accuracy_metric_closed_form():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == pytest.approx(0.5)


def test_evaluate_matches_manual_loop():
    task = build_task("digits")
    torch.manual_seed(0)
    model = build_model("lenet300", task)
    correct = total = 0
    with torch.no_grad():
        for x, y in task.test:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    assert task.evaluate(model) == pytest.approx(correct / total)


def test_example_inputs_resizes_batch():
    task = build_task("digits")
    assert task.example_inputs(1000).shape == (1000, 64)
    assert task.example_inputs(3).shape == (3, 64)


def test_model_that_does_not_fit_task_is_one_line_error():
    task = build_task("digits")
    wrong_classes = build_model("lenet300", in_shape=(64,), num_classes=5)
    with pytest.raises(TaskError, match="5 values per sample.*10 classes"):
        task.check_model(wrong_classes)
    wrong_inputs = build_model("lenet300", in_shape=(40,), num_classes=10)
    with pytest.raises(TaskError) as err:
        task.check_model(wrong_inputs)
    assert "does not fit task 'digits'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec,msg",
    [("nomodule_xyz:fn", "cannot import module"), ("torchslim.core.task:nope", "has no callable 'nope'"),
     ("no-colon", "expected 'package.module:function'"), ("torchslim.core.task:accuracy", None)],
)
def test_task_from_spec_errors_are_clear(spec, msg):
    with pytest.raises(TaskError) as err:
        Task.from_spec(spec) if msg else Task.from_spec(spec, outputs=torch.zeros(1), targets=torch.zeros(1))
    text = str(err.value)
    assert "\n" not in text
    if msg:
        assert msg in text


def test_task_from_spec_loads_user_function(tmp_path, monkeypatch):
    (tmp_path / "my_task_mod.py").write_text(
        "from torchslim.zoo.data import from_arrays\n"
        "import numpy as np\n"
        "def make():\n"
        "    rng = np.random.default_rng(0)\n"
        "    return from_arrays('mine', rng.normal(size=(100, 5)), np.arange(100) % 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = Task.from_spec("my_task_mod:make")
    assert task.name == "mine" and task.num_classes == 2 and task.input_shape == (5,)


def test_unknown_zoo_names_list_the_choices():
    with pytest.raises(TaskError, match="unknown task 'digit'.*digits"):
        build_task("digit")
    with pytest.raises(TaskError, match="unknown model 'lenet'.*lenet300"):
        build_model("lenet")


def test_npz_and_csv_loaders(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), np.array([3, 7] * 25)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    t = build_task("npz", path=str(tmp_path / "d.npz"))
    assert t.num_classes == 2 and sum(len(b[1]) for b in t.test) == 10
    np.savetxt(tmp_path / "d.csv", np.c_[x, y], delimiter=",", header="a,b,c,label", comments="")
    t2 = build_task("csv", path=str(tmp_path / "d.csv"))
    assert t2.input_shape == (3,) and t2.num_classes == 2
    with pytest.raises(TaskError, match="no array named 'z'"):
        build_task("npz", path=str(tmp_path / "d.npz"), x_key="z")

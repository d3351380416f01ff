"""Task and model kwargs are checked against the builder's signature and bounded (issue 12)."""

import pytest

from torchslim.core.errors import TaskError
from torchslim.zoo import build_model, build_task


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, r"kwargs.batch_size must be an integer in \[1, 65536\], got 0"),
    ({"batch_size": True}, "got True"),
    ({"colour": 1}, "unknown kwarg 'colour'; it takes num_samples, batch_size, seed"),
    ({"num_samples": 10**9}, "num_samples must be an integer"),
])
def test_task_kwargs(kwargs, match):
    with pytest.raises(TaskError, match=match):
        build_task("mnist1d", **kwargs)


@pytest.mark.parametrize("name,kwargs,match", [
    ("mlp", {"hidden": [0]}, "hidden must be a non-empty list"),
    ("mlp", {"hidden": []}, "hidden must be a non-empty list"),
    ("rescnn1d", {"width": 0}, "width must be an integer"),
    ("lenet300", {"colour": 1}, "unknown kwarg 'colour'"),
])
def test_model_kwargs(name, kwargs, match):
    with pytest.raises(TaskError, match=match):
        build_model(name, build_task("digits"), **kwargs)
    assert build_model("mlp", build_task("digits"), hidden=[16]).net[1].out_features == 16

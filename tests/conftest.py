"""Test-suite settings: one torch thread (tiny models; on a busy 2-core machine extra OpenMP
threads only wait on each other) and no network for Hugging Face."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    # the gallery's torchvision cannot load its C ops beside the CPU torch; transformers imports
    # torchvision when it is installed, so the workaround must come first (torchslim.core.compat)
    from torchslim.core.compat import import_torchvision

    import_torchvision()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lenet300_digits():
    """(LeNet-300-100 briefly trained on digits, in eval mode; the digits task), built per test
    module: the reference model of the int8 backend tests."""
    from torchslim.core.train import TrainConfig, fit
    from torchslim.zoo import build_model, build_task

    task = build_task("digits")
    torch.manual_seed(0)
    model = build_model("lenet300", task)
    fit(model, task, TrainConfig(epochs=1, max_steps=60, lr=3e-3, seed=0, device="cpu"))
    return model.eval(), task

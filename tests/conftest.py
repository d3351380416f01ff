"""Test-suite settings: one torch thread (tiny models; on a busy 2-core machine extra OpenMP
threads only wait on each other) and no network for Hugging Face."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    # the gallery's torchvision cannot load its C ops beside the CPU torch; transformers imports
    # torchvision when it is installed, so the workaround must come first (torchslim.compat)
    from torchslim.compat import import_torchvision

    import_torchvision()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

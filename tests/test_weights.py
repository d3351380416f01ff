import os
import pickle

import pytest
import torch

from torchslim.core.errors import WeightsError
from torchslim.export.weights import load_weights, read_state_dict, save_weights
from torchslim.zoo import build_model


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/torchslim_pwned",))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_is_exact(tmp_path, suffix):
    m = build_model("lenet300")
    path = save_weights(m, tmp_path / f"w{suffix}")
    m2 = load_weights(build_model("lenet300"), path)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_pickle_payload_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "x": Evil()}, path)
    if os.path.exists("/tmp/torchslim_pwned"):
        os.remove("/tmp/torchslim_pwned")
    with pytest.raises(WeightsError, match="refused") as err:
        read_state_dict(path)
    assert "\n" not in str(err.value)
    assert not os.path.exists("/tmp/torchslim_pwned")


def test_missing_and_mismatched_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    path = save_weights(build_model("lenet300"), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="has shape"):
        load_weights(build_model("lenet300", in_shape=(40,)), path)
    with pytest.raises(WeightsError, match="missing"):
        load_weights(build_model("mlp"), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2, 3])[:5])
    with pytest.raises(WeightsError):
        read_state_dict(tmp_path / "junk.pt")

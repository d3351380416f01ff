"""Artifacts are verified (issue 12, point 5): a checksum in torchslim's sparse files, checked on
load; identical runs write identical bytes; `inspect` opens every file a run writes and gives
one line for a damaged one."""

import copy

import pytest
import torch

from torchslim.app import cli
from torchslim.app.runner import run_recipe
from torchslim.core.errors import WeightsError
from torchslim.export.sparse import load_sparse, save_sparse

RECIPE = {"task": {"name": "digits", "kwargs": {"batch_size": 64}}, "model": "lenet300", "seed": 3,
          "stages": [{"prune": {"sparsity": 0.8}}, {"quantize": {"mode": "dynamic", "backend": "onnxruntime"}}],
          "measure": {"batch_size": 8, "repeats": 1}, "export": ["onnx"]}


def _state():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    w[w.abs() < 1] = 0
    return {"a.weight": w, "a.bias": torch.randn(64)}


def test_sparse_checksum_catches_a_flipped_byte(tmp_path):
    path = save_sparse(_state(), tmp_path / "s.bin")
    assert torch.equal(load_sparse(path)["a.weight"], _state()["a.weight"])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a bit in the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match its checksum"):
        load_sparse(path)
    path.write_bytes(bytes(data[:40]))
    with pytest.raises(WeightsError, match="damaged"):
        load_sparse(path)


def test_sparse_files_are_byte_identical(tmp_path):
    a, b = save_sparse(_state(), tmp_path / "a.bin"), save_sparse(_state(), tmp_path / "b.bin")
    assert a.read_bytes() == b.read_bytes()


def test_identical_runs_write_identical_artifacts_and_inspect_opens_them(tmp_path, capsys):
    one = run_recipe(copy.deepcopy(RECIPE), out=tmp_path / "one", log=lambda m: None)
    two = run_recipe(copy.deepcopy(RECIPE), out=tmp_path / "two", log=lambda m: None)
    for r1, r2 in zip(one["rows"], two["rows"]):
        f1, f2 = tmp_path / "one" / r1["artifact"], tmp_path / "two" / r2["artifact"]
        assert f1.read_bytes() == f2.read_bytes(), r1["artifact"]
        assert cli.main(["inspect", str(f1)]) == 0, capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "one" / "model.onnx")]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("damage", ["empty", "truncated onnx", "garbage"])
def test_inspect_damaged_files_is_one_line(tmp_path, capsys, damage):
    path = tmp_path / "m.onnx"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated onnx":
        import onnx

        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        path.write_bytes(onnx.helper.make_model(g).SerializeToString()[:-7])
    else:
        path.write_bytes(b"\x08\xff\xff\xff\xff\xff" * 50)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("torchslim: error: inspect:")


def _flip_in(data: bytearray, needle: bytes) -> bytearray:
    """Flip one bit inside the first occurrence of needle (a tensor's raw bytes in the file)."""
    at = bytes(data).find(needle)
    assert at >= 0, "tensor bytes not found in the file"
    data[at + len(needle) // 2] ^= 0x01
    return data


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_checksum_catches_a_flipped_byte(tmp_path, suffix):
    from torchslim.export.weights import read_state_dict, save_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = save_weights(model, tmp_path / f"w{suffix}")
    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())  # the checksum entry is not a weight
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    raw = model[0].weight.detach().numpy().tobytes()
    path.write_bytes(bytes(_flip_in(bytearray(path.read_bytes()), raw[:256])))
    with pytest.raises(WeightsError, match="does not match its checksum"):
        read_state_dict(path)


def test_quantized_file_checksum(tmp_path):
    from torchslim.export.weights import read_state_dict
    from torchslim.quantization import QuantConfig, simulate
    from torchslim.quantization.ptq import save_quantized
    from torchslim.zoo import build_model, build_task

    task = build_task("digits", batch_size=64)
    model = build_model("lenet300", task)
    qmodel, _ = simulate(model, QuantConfig(mode="weights_only", backend="simulate"), task)
    path = tmp_path / "q.pt"
    save_quantized(qmodel, str(path))
    state = read_state_dict(path)
    assert any(k.endswith(".qweight") for k in state)
    q = next(v for k, v in state.items() if k.endswith(".qweight"))
    path.write_bytes(bytes(_flip_in(bytearray(path.read_bytes()), q.numpy().tobytes()[:256])))
    with pytest.raises(WeightsError, match="does not match its checksum"):
        read_state_dict(path)


def test_onnx_checksum_is_checked_by_inspect(tmp_path, capsys):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from torchslim.export.onnx import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = export_onnx(model, torch.randn(2, 32), tmp_path / "m.onnx")
    assert any(p.key == "torchslim.sha256" for p in onnx.load(str(path)).metadata_props)
    assert cli.main(["inspect", str(path)]) == 0
    capsys.readouterr()
    init = max(onnx.load(str(path)).graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    raw = np.ascontiguousarray(numpy_helper.to_array(init)).tobytes()
    path.write_bytes(bytes(_flip_in(bytearray(path.read_bytes()), raw[:256])))
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its checksum" in err[0]


def test_torchao_file_checksum_and_inspect(tmp_path, capsys):
    pytest.importorskip("torchao")
    from torchslim.export.weights import read_state_dict
    from torchslim.quantization.torchao_backend import TorchaoConfig, save_torchao, torchao_quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    q, _ = torchao_quantize(model, TorchaoConfig(scheme="int8_weight_only"))
    path = tmp_path / "ao.pt"
    save_torchao(q, str(path))
    state = read_state_dict(path)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert cli.main(["inspect", str(path)]) == 0
    assert "0.weight.qdata" in capsys.readouterr().out
    raw = state["0.weight"].qdata.numpy().tobytes()
    path.write_bytes(bytes(_flip_in(bytearray(path.read_bytes()), raw[:256])))
    with pytest.raises(WeightsError, match="does not match its checksum"):
        read_state_dict(path)


def test_onnx_cut_before_its_checksum_is_refused(tmp_path, capsys):
    import onnx

    from torchslim.export.onnx import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    path = export_onnx(model, torch.randn(2, 8), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert proto.producer_name == "torchslim"
    del proto.metadata_props[:]  # what a cut just before the last field leaves
    path.write_bytes(proto.SerializeToString())
    assert cli.main(["inspect", str(path)]) == 2
    assert "checksum is missing" in capsys.readouterr().err

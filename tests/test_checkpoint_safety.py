"""Nothing a checkpoint holds can run code (issue 12, point 1): a planted `.state/model.pt` or
`.state/baseline.pt` used to run its payload on `torchslim run --resume`."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from torchslim.app.checkpoint import CheckpointError, load_module, save_module


def _marker(tmp_path):
    return tmp_path / "PWNED"


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _payloads(tmp_path):
    marker = _marker(tmp_path)
    touch = f"open({str(marker)!r}, 'w').write('x')"
    mod = tmp_path / "evil_on_import_xyz.py"
    mod.write_text(f"{touch}\nclass Thing:\n    pass\n")
    # a pickle naming a class of a module nobody imported: resolving it would import (run) it
    unimported = (b"\x80\x02cevil_on_import_xyz\nThing\nq\x00)\x81q\x01.")
    return {
        "exec": _Exec(touch),
        "os.system": _System(f"touch {marker}"),
        "nested in a module": nn.Sequential(nn.Linear(2, 2)),
        "unimported module": unimported,
    }


def _write(path, payload):
    if isinstance(payload, bytes):  # a raw pickle inside a torch zip, as torch.save lays it out
        torch.save({"x": 1}, path)
        import zipfile

        with zipfile.ZipFile(path) as z:
            names = {n: z.read(n) for n in z.namelist()}
        data_pkl = next(n for n in names if n.endswith("data.pkl"))
        names[data_pkl] = payload
        with zipfile.ZipFile(path, "w") as z:
            for n, b in names.items():
                z.writestr(n, b)
        return
    if isinstance(payload, nn.Module):
        payload._evil = _Exec(f"open({str(path.parent / 'PWNED')!r}, 'w')")
    torch.save(payload, path, pickle_protocol=2)


@pytest.mark.parametrize("kind", ["exec", "os.system", "nested in a module", "unimported module"])
def test_load_module_refuses_every_payload(tmp_path, kind, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "model.pt"
    _write(path, _payloads(tmp_path)[kind])
    with pytest.raises(CheckpointError, match="refused|damaged"):
        load_module(path)
    assert not _marker(tmp_path).exists()
    assert "evil_on_import_xyz" not in sys.modules


def test_damaged_or_raw_pickle_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="damaged"):
        load_module(path)
    with open(path, "wb") as fh:  # a plain pickle, not torch's zip layout
        pickle.dump(_System(f"touch {_marker(tmp_path)}"), fh, protocol=2)
    with pytest.raises(CheckpointError):
        load_module(path)
    assert not _marker(tmp_path).exists()


def test_every_technique_model_round_trips():
    """The allowlist is not so tight that the runner's own checkpoints stop loading."""
    import warnings

    import torchslim
    from torchslim import QuantConfig, ShareConfig
    from torchslim.zoo import build_model, build_task

    warnings.filterwarnings("ignore")
    task = build_task("digits")
    x = task.example_inputs(8)
    models = {
        "plain": build_model("lenet300", task),
        "shared": torchslim.cluster(build_model("lenet300", task), ShareConfig(bits=4), task).model,
        "fake-quant": torchslim.quantize(build_model("lenet300", task), QuantConfig(mode="static"), task).model,
        "cnn": build_model("rescnn1d", in_shape=(40,), num_classes=10, width=8, blocks=1),
    }
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name, model in models.items():
            model.eval()
            path = save_module(model, os.path.join(d, f"{name}.pt"))
            back = load_module(path).eval()
            inp = x if name != "cnn" else torch.randn(4, 40)
            assert torch.equal(back(inp), model(inp)), name


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["stage-1.pt", "baseline.pt"])
def test_resume_with_a_planted_checkpoint_refuses_in_one_line(tmp_path, planted):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "payload", "task": {"name": "digits", "kwargs": {"batch_size": 32}}, "model": "lenet300",
        "seed": 0, "stages": [{"prune": {"sparsity": 0.5}}],
        "measure": {"batch_size": 16, "repeats": 2},
    }))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torchslim.app.cli", "run", str(recipe), "--out", str(out), "--no-report"]
    assert subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0
    assert json.loads((out / ".state" / "state.json").read_text())["checkpointed"] == [0, 1]
    marker = tmp_path / "PWNED"
    torch.save(_System(f"touch {marker}"), out / ".state" / planted)
    proc = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "checkpoint refused" in proc.stderr and "system" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()

import json
import subprocess
import sys

import pytest
import torch

from torchslim.app import cli
from torchslim.export.weights import save_weights
from torchslim.zoo import build_model


def _run(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_everywhere():
    for cmd in ([], ["demo"], ["measure"], ["run"], ["report"], ["inspect"], ["machine"]):
        proc = subprocess.run([sys.executable, "-m", "torchslim.app.cli", *cmd, "--help"], capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and "usage: torchslim" in proc.stdout


def test_machine_names_the_isa(capsys):
    import torch

    from torchslim.core.isa import cpu_isa

    code, out, _ = _run(["machine", "--json"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["isa"] == cpu_isa()["summary"]
    assert facts["isa_facts"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    code, out, _ = _run(["machine"], capsys)
    assert code == 0 and cpu_isa()["summary"] in out


def test_measure_prints_table_and_writes_json(tmp_path, capsys):
    weights = save_weights(build_model("lenet300"), tmp_path / "w.safetensors")
    code, out, err = _run(["measure", "--task", "digits", "--model", "lenet300", "--weights", str(weights),
                           "--batch-size", "8", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert "50,610" in out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["params"] == 50610 and rec["bytes"] == weights.stat().st_size


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case", ["bad_spec", "missing_weights", "pickle_payload", "wrong_shape", "unknown_model", "bad_batch"])
def test_bad_input_is_one_line_and_nonzero(case, tmp_path, capsys):
    args = ["measure", "--task", "digits", "--model", "lenet300"]
    if case == "bad_spec":
        args[2] = "no_such_pkg.mod:make"
    elif case == "missing_weights":
        args += ["--weights", str(tmp_path / "missing.pt")]
    elif case == "pickle_payload":
        torch.save({"net.1.weight": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pt")
        args += ["--weights", str(tmp_path / "evil.pt")]
    elif case == "wrong_shape":
        args[2], args[4] = "mnist1d", "lenet5"  # lenet5 needs square images; MNIST-1D signals are 40 long
    elif case == "unknown_model":
        args[4] = "resnet9000"
    elif case == "bad_batch":
        args += ["--batch-size", "0"]
    code, out, err = _run(args, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchslim: error:"), err
    assert "pwned" not in out


def test_model_output_that_does_not_fit_the_task(tmp_path, capsys, monkeypatch):
    (tmp_path / "five_class.py").write_text(
        "from torchslim.zoo.models import MLP\n"
        "def make():\n    return MLP(64, (32,), 5)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = _run(["measure", "--task", "digits", "--model", "five_class:make"], capsys)
    assert code == 2 and "outputs 5 values per sample, the task has 10 classes" in err
    assert len(err.strip().splitlines()) == 1


def test_inspect_lists_tensors_of_archive_and_state_dict(tmp_path, capsys):
    from torchslim.export.archive import save_archive

    model = build_model("lenet300")
    save_weights(model, tmp_path / "w.safetensors")
    save_archive(model, str(tmp_path / "m.tsla"))
    for name in ("w.safetensors", "m.tsla"):
        code, out, err = _run(["inspect", str(tmp_path / name)], capsys)
        assert code == 0, err
        assert "net.1.weight" in out and "net.5.bias" in out
    (tmp_path / "x.bin").write_bytes(b"????")
    code, _, err = _run(["inspect", str(tmp_path / "x.bin")], capsys)
    assert code == 2 and "unknown file type" in err

"""A recipe that names code runs it only when the user approves (issue 12, point 2)."""

import subprocess
import sys

import yaml

MODULE = '''
import pathlib
pathlib.Path("IMPORTED").write_text("x")

def make_model(**kw):
    from torchslim.zoo import build_model
    return build_model("lenet300")
'''


def _recipe(tmp_path, **extra):
    r = {"task": {"name": "digits", "kwargs": {"batch_size": 64}}, "model": "my_models:make_model",
         "stages": [{"prune": {"sparsity": 0.5}}], "measure": {"batch_size": 8, "repeats": 1}, **extra}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "torchslim.app.cli", "run", *args, "--out", "out", "--no-report"],
                          cwd=tmp_path, capture_output=True, text=True, check=False)


def test_code_in_a_recipe_needs_trust_and_is_found_in_the_current_folder(tmp_path):
    (tmp_path / "my_models.py").write_text(MODULE)
    recipe = _recipe(tmp_path)
    proc = _run(tmp_path, str(recipe))
    assert proc.returncode == 2 and "--trust-code" in proc.stderr and "my_models:make_model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "IMPORTED").exists()  # refused before anything was imported
    proc = _run(tmp_path, str(recipe), "--trust-code")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "IMPORTED").exists() and (tmp_path / "out" / "run.json").exists()


def test_trust_code_list_limits_the_modules(tmp_path):
    (tmp_path / "my_models.py").write_text(MODULE)
    proc = _run(tmp_path, str(_recipe(tmp_path, trust_code=["other_mod"])), "--trust-code")
    assert proc.returncode == 2 and "trust_code lists only ['other_mod']" in proc.stderr
    assert not (tmp_path / "IMPORTED").exists()

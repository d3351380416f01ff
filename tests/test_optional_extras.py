"""`import torchslim` works without the optional extras (issue 11): with torch-pruning, ONNX,
ONNX Runtime, torchao, transformers, optuna and the plotting libraries all absent, the package
imports, every technique that needs none of them is registered, and a technique that needs one
refuses in one line naming the extra."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("torch_pruning", "onnx", "onnxruntime", "onnxscript", "torchao", "transformers",
            "sentence_transformers", "optuna", "plotly", "matplotlib", "gymnasium", "stable_baselines3")

SCRIPT = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as when it is not installed
import torchslim
from torchslim.core.stage import stage_names
from torchslim.zoo import build_model, build_task
names = stage_names()
assert {{"prune", "nm", "share", "lowrank", "distill", "train", "quantize"}} <= set(names), sorted(names)
task = build_task("digits", batch_size=64)
model = build_model("lenet300", task)
try:
    torchslim.prune(model, torchslim.StructuredPruneConfig(macs_keep=0.5), task)
except torchslim.ConfigError as exc:
    print("REFUSED:", exc)
"""


def test_import_without_optional_extras():
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=240,
                         env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    refused = [line for line in out.stdout.splitlines() if line.startswith("REFUSED:")]
    assert refused and "pip install 'torchslim[prune]'" in refused[0], out.stdout

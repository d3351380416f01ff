"""B14: 20 SIGKILLs at random moments of a recipe run, each followed by ``--resume``: the
finished run must equal an uninterrupted one (metrics, parameters, non-zeros, bytes, MACs of
every row, and the bytes of every artifact), and no temp file may be left (issue 12).

The recipe (digits, LeNet-300-100: baseline training, gradual pruning with fine-tuning, ONNX
Runtime int8) runs in a subprocess; a kill lands at a uniformly random moment of the run's
measured duration, so it hits training, checkpoint writes, measurement and export alike.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ID = "B14"
TITLE = "kill -9 at random moments then --resume: identical results and artifact bytes"
HEADLINE = ["kills", "identical_runs", "mismatches", "stray_temp_files"]
STABLE = ("stage", "metric", "params", "nonzeros", "bytes", "macs_per_sample", "artifact")
RECIPE = {
    "name": "b14", "task": {"name": "digits", "kwargs": {"batch_size": 64}}, "model": "lenet300", "seed": 14,
    "train": {"epochs": 4, "lr": 0.003, "device": "cpu"},
    "stages": [{"prune": {"sparsity": 0.8, "schedule": "gradual", "finetune": {"epochs": 3, "lr": 0.001}}},
               {"quantize": {"mode": "dynamic", "backend": "onnxruntime"}}],
    "measure": {"batch_size": 32, "repeats": 3, "threads": 1}, "export": ["onnx"],
}


def _cmd(recipe: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "torchslim.app.cli", "run", str(recipe), "--out", str(out), "--no-report",
            *(["--resume"] if resume else [])]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _fingerprint(out: Path) -> dict:
    run = json.loads((out / "run.json").read_text())
    rows = [{k: r.get(k) for k in STABLE} for r in run["rows"]]
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "artifacts").iterdir())}
    files["model.onnx"] = (out / "model.onnx").read_bytes()
    return {"rows": rows, "files": files}


def run(quick: bool = False) -> dict:
    kills = 5 if quick else 20
    rng = random.Random(14)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        recipe = d / "r.json"
        recipe.write_text(json.dumps(RECIPE))
        start = time.perf_counter()
        subprocess.run(_cmd(recipe, d / "ref", False), env=_env(), check=True, capture_output=True)
        duration = time.perf_counter() - start
        ref = _fingerprint(d / "ref")
        outcomes, mismatches, stray = [], [], 0
        for k in range(kills):
            out = d / f"victim{k}"
            victim = subprocess.Popen(_cmd(recipe, out, False), env=_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            at = rng.uniform(0.05, 0.95) * duration
            time.sleep(at)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            state = out / ".state" / "state.json"
            done = json.loads(state.read_text())["done"] if state.exists() else None
            resumed = subprocess.run(_cmd(recipe, out, state.exists()), env=_env(), capture_output=True, text=True,
                                     check=False)
            if resumed.returncode != 0:
                mismatches.append({"kill": k, "at_s": round(at, 2), "error": resumed.stderr.strip()[-300:]})
                continue
            temps = list(out.rglob("*.tmp"))
            stray += len(temps)
            got = _fingerprint(out)
            same = got == ref
            if not same:
                bad = [n for n in ref["files"] if got["files"].get(n) != ref["files"][n]]
                mismatches.append({"kill": k, "at_s": round(at, 2), "rows_equal": got["rows"] == ref["rows"],
                                   "files_differ": bad})
            outcomes.append({"kill": k, "at_s": round(at, 2), "stages_done_at_kill": done,
                             "killed_before_state": done is None, "identical": same})
    return {
        "kills": kills, "identical_runs": sum(o["identical"] for o in outcomes), "mismatches": len(mismatches),
        "stray_temp_files": stray, "uninterrupted_seconds": round(duration, 2), "outcomes": outcomes,
        "mismatch_detail": mismatches, "recipe": RECIPE,
        "notes": "a kill before the first state.json is followed by a fresh run (nothing to resume)",
    }

"""No sample lost (issue 15, point 5): an online run killed with SIGKILL between two checkpoints
and resumed continues at the next unseen batch, and ends bit-identical to an uninterrupted run
with the same seed — weights, masks, optimizer-driven curve, drift events and segment scores.
The run has everything that carries state: pruning masks, Adam, a StepLR schedule, a replay
reservoir, EWC, ADWIN and the LR boost after a drift (a label permutation halfway)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

WORKER = r'''
import json, sys, time
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from torchslim.online import ArrayStream, OnlineConfig, online
from torchslim.pruning import attach_masks, masks_of
from torchslim.zoo import build_model

ckpt, out, slow, resume, start = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
saved = load_file(start)  # the trained, pruned model and the data, written once by the test
model = build_model("lenet300", None, in_shape=(64,), num_classes=10)
model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
attach_masks(model, {k[5:]: v.bool() for k, v in saved.items() if k.startswith("mask.")})
x, y = saved["x"], saved["y"]
perm = torch.tensor([3, 7, 1, 9, 0, 2, 8, 4, 6, 5])
stream = ArrayStream(torch.cat([x, x]), torch.cat([y, perm[y]]), 16)
cfg = OnlineConfig(lr=2e-3, scheduler="StepLR", scheduler_kwargs={"step_size": 30, "gamma": 0.7},
                   replay_capacity=64, replay_batch=8, ewc_lambda=5.0, ewc_batches=4, boost_lr=2.0,
                   boost_batches=8, checkpoint_every=7, eval_every=10, seed=5, progress=False)
sets = {"old": (x[:200], y[:200]), "new": (x[:200], perm[y[:200]])}
r = online(model, stream, cfg, eval_sets=sets, checkpoint_dir=ckpt, resume=resume,
           on_batch=(lambda i, p: time.sleep(slow)) if slow else None)
state = {k: v.contiguous() for k, v in model.state_dict().items()}
state.update({"mask." + k: v.to(torch.uint8) for k, v in masks_of(model).items()})
save_file(state, out + ".safetensors")
d = r.to_dict()
for k in ("seconds", "samples_per_s", "resumed_from"):
    d.pop(k)
json.dump({"result": d, "resumed_from": r.resumed_from}, open(out + ".json", "w"))
'''


def _start_file(tmp: Path) -> Path:
    """LeNet-300-100 briefly trained on digits, 90% pruned (masks), and 800 training samples."""
    from safetensors.torch import save_file

    from torchslim.core.train import TrainConfig, fit
    from torchslim.pruning import PruneConfig, masks_of, prune
    from torchslim.zoo import build_model, build_task

    task = build_task("digits", batch_size=64)
    torch.manual_seed(0)
    model = build_model("lenet300", task)
    fit(model, task, TrainConfig(epochs=1, lr=3e-3, seed=0, device="cpu"))
    model = prune(model, PruneConfig(sparsity=0.9, scope="layer"), task).model
    xs, ys = zip(*task.train)  # one pass: x and y from the same shuffle
    state = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}
    state.update({"mask." + k: v.to(torch.uint8) for k, v in masks_of(model).items()})
    state.update(x=torch.cat(xs)[:800].contiguous(), y=torch.cat(ys)[:800].contiguous())
    save_file(state, tmp / "start.safetensors")
    return tmp / "start.safetensors"


def _run(tmp: Path, name: str, slow: float = 0.0, resume: bool = False, ckpt: str = "ck"):
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(script), str(tmp / ckpt), str(tmp / name), str(slow), "1" if resume else "0",
            str(tmp / "start.safetensors")]
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)


def _offset(path: Path) -> int:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return json.loads(payload["loop"])["offset"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    _start_file(tmp_path)
    ref = _run(tmp_path, "ref", ckpt="ck_ref")
    victim = _run(tmp_path, "victim", slow=0.03)
    ckpt = tmp_path / "ck" / "online.pt"
    deadline = time.monotonic() + 120
    while not (ckpt.exists() and _offset(ckpt) >= 28) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # ~3 batches past a checkpoint: the kill lands between two of them
    assert victim.poll() is None, f"the run ended before it could be killed: {victim.stderr.read()[-2000:]}"
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(30) == -signal.SIGKILL
    killed_at = _offset(ckpt)
    assert 28 <= killed_at < 100
    resumed = _run(tmp_path, "victim", resume=True)
    assert resumed.wait(240) == 0, resumed.stderr.read()[-2000:]
    assert ref.wait(240) == 0, ref.stderr.read()[-2000:]
    a, b = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "victim.json").read_text())
    assert b["resumed_from"] == killed_at and a["resumed_from"] is None
    ra, rb = a["result"], b["result"]
    assert rb["batches"] == ra["batches"] == 100 and rb["samples"] == ra["samples"] == 1600  # none lost, none twice
    assert [p["batch"] for p in rb["curve"]] == list(range(100))
    assert rb == ra  # curve, drift events, segment scores, regrowth, fingerprints: identical
    assert any(e["direction"] == "up" for e in ra["drift_events"])  # the boost/EWC path really ran
    wa, wb = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "victim.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("mask.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

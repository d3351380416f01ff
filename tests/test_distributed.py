"""DDP and FSDP2 under torchrun (gloo, CPU, 2 processes) against the same run in one process.

Why the tolerances hold: ranks train on slices of the *same* global batches one process sees,
weighted so DDP's gradient average is the global batch's mean (``distributed.shard_batch``),
so 2 processes follow the 1-process trajectory up to float summation order (measured: weights
within 1e-7 after 5 epochs). The tolerances below (accuracy within 1 test sample in 100,
weights within 1e-3) leave room for AVX2 vs AVX-512 reduction orders, and are far tighter than
run-to-run noise between seeds (several points on digits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchslim.app.runner import run_recipe
from torchslim.core import distributed
from torchslim.core.errors import ConfigError
from torchslim.core.train import TrainConfig

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import train_worker

RECIPE = {
    "name": "ddp test",
    "task": {"name": "digits", "kwargs": {"batch_size": 64}},
    "model": "lenet300",
    "seed": 0,
    # the baseline trains under FSDP2 (fully_shard, gloo): same entry point, sharded weights
    "train": {**train_worker.DDP_TRAIN, "distributed": "fsdp"},
    "stages": [
        {"name": "prune", "prune": {"sparsity": 0.8, "schedule": "oneshot",
                                    "finetune": {**train_worker.DDP_TRAIN, "lr": 0.02}}},
        {"name": "recover", "train": {**train_worker.DDP_TRAIN, "epochs": 1, "lr": 0.01}},
    ],
    "export": ["safetensors"],
    "measure": {"batch_size": 64, "threads": 1, "repeats": 3},
}
ACC_TOL = 0.01
W_TOL = 1e-3


def _torchrun(tmp: Path, out: Path, spy: Path, kill: str = "", resume: str = "0") -> subprocess.CompletedProcess:
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "train_worker.py"), "ddp", str(recipe), str(out), str(spy), kill, resume]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp, check=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same recipe and the same gradual pruning in this one process (fsdp/ddp are ignored)."""
    tmp = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    summary = run_recipe(RECIPE, out=tmp / "out", log=lambda m: None)
    pruned, metric, seen = train_worker.gradual_prune_digits()
    return {"out": tmp / "out", "metrics": [r["metric"] for r in summary["rows"]], "gradual": pruned,
            "gradual_metric": metric, "seen": seen}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    done = _torchrun(tmp, tmp / "out", tmp / "spy")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_ddp_run_matches_one_process_and_writes_one_set_of_artifacts(ddp, single):
    ranks = [json.loads((ddp / "spy" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # every rank ends the run with the same rows (rank 0 measured them and broadcast them)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"] == pytest.approx(single["metrics"], abs=ACC_TOL)
    assert ranks[1]["log"] == []  # only rank 0 talks
    # one set of outputs: exactly what a 1-process run writes, nothing per rank
    files = sorted(str(p.relative_to(ddp / "out")) for p in (ddp / "out").rglob("*") if p.is_file())
    expected = sorted(str(p.relative_to(single["out"])) for p in single["out"].rglob("*") if p.is_file())
    assert files == expected
    assert sorted(p.name for p in ddp.iterdir()) == ["out", "recipe.json", "spy"]
    a, b = _weights(ddp / "out" / "model.safetensors"), _weights(single["out"] / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < W_TOL
    # the FSDP2-trained baseline equals the 1-process baseline
    fa, fb = _weights(ddp / "out" / "artifacts" / "00-baseline.safetensors"), \
        _weights(single["out"] / "artifacts" / "00-baseline.safetensors")
    assert max((fa[k] - fb[k]).abs().max().item() for k in fa) < W_TOL


def test_gradual_pruning_masks_identical_on_both_ranks(ddp, single):
    r0, r1 = (torch.load(ddp / "spy" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    # the ranks split every global batch: each trained on half the samples, together on all of
    # them, in the order one process sees (rank 0 the first half of each batch)
    n0, n1, n = len(r0["seen"]), len(r1["seen"]), len(single["seen"])
    assert n0 + n1 == n and abs(n0 - n1) <= 4 * 2  # 4 epochs, uneven last batches
    assert torch.equal(torch.sort(torch.cat([r0["seen"], r1["seen"]]))[0], torch.sort(single["seen"])[0])
    assert torch.equal(r0["seen"][:32], single["seen"][:32]) and torch.equal(r1["seen"][:32], single["seen"][32:64])
    j0, j1 = (json.loads((ddp / "spy" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert j0["digest"] == j1["digest"]
    # the schedule reached the target on both ranks and matches one process
    kept = sum(int(m.sum()) for m in r0["masks"].values())
    total = sum(m.numel() for m in r0["masks"].values())
    assert 1 - kept / total == pytest.approx(0.9, abs=1e-3)
    assert j0["gradual_metric"] == pytest.approx(single["gradual_metric"], abs=ACC_TOL)
    from torchslim.pruning.masks import masks_of

    ref = masks_of(single["gradual"])
    agree = sum(int((ref[k].cpu() == r0["masks"][k]).sum()) for k in ref) / total
    assert agree > 0.999  # a weight sitting exactly at the threshold may flip with the summation order


def test_fsdp2_fit_on_gloo_matches_one_process_and_refuses_mask_hooks(ddp):
    j0, j1 = (json.loads((ddp / "spy" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert j0["fsdp_parallel"] == j1["fsdp_parallel"] == "fsdp x2"
    w0, w1 = (torch.load(ddp / "spy" / f"fsdp-rank{r}.pt", weights_only=True) for r in (0, 1))
    ref, fitted = train_worker.dense_fit_digits("fsdp")  # one process: the mode is ignored
    assert fitted.parallel == "single"
    for k, v in ref.state_dict().items():
        assert torch.equal(w0[k], w1[k]), k  # every rank ends with the same full weights
        assert (w0[k] - v).abs().max().item() < W_TOL, k
    assert "MaskKeeper" in j0["fsdp_refusal"] and "use distributed: ddp" in j0["fsdp_refusal"]


def test_resume_after_a_rank_is_killed(ddp, single, tmp_path):
    out, spy = tmp_path / "out", tmp_path / "spy"
    killed = _torchrun(tmp_path, out, spy, kill="recover")
    assert killed.returncode != 0
    state = json.loads((out / ".state" / "state.json").read_text())
    assert state["done"] == 1 and not (out / "run.json").exists()
    resumed = _torchrun(tmp_path, out, spy, resume="1")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = json.loads((spy / "rank0.json").read_text())["log"]
    assert any("resuming after stage 1" in line for line in log)
    metrics = json.loads((out / "run.json").read_text())["rows"]
    assert [r["metric"] for r in metrics] == pytest.approx(single["metrics"], abs=ACC_TOL)
    a, b = _weights(out / "model.safetensors"), _weights(single["out"] / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < W_TOL


def test_shard_batch_weights_make_the_global_mean():
    x = torch.arange(10.0).reshape(5, 2)
    y = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    parts = [distributed.shard_batch({"x": x}, y, r, 2) for r in range(2)]
    assert [len(p[1]) for p in parts] == [3, 2]
    assert [p[2] for p in parts] == pytest.approx([1.2, 0.8])
    assert torch.equal(torch.cat([p[0]["x"] for p in parts]), x)
    # DDP averages: mean over ranks of weight * local mean == the global mean
    assert sum(w * t.mean() for _, t, w in parts).item() / 2 == pytest.approx(y.mean().item(), rel=1e-6)
    lone = [distributed.shard_batch(x[:1], y[:1], r, 3) for r in range(3)]
    assert [w for *_, w in lone] == [3.0, 0.0, 0.0] and all(len(t) == 1 for _, t, _ in lone)


def test_single_process_helpers_are_no_ops():
    from torchslim.zoo import build_model, build_task

    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    model = build_model("lenet300", build_task("digits"))
    before = distributed.digest(model)
    distributed.sync_module(model, "x")
    assert distributed.verify_identical(model, "x") == before
    with torch.no_grad():
        model.net[1].weight[0, 0] += 1
    assert distributed.digest(model) != before
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_mean(2.5) == 2.5


def test_config_and_launcher_refuse_bad_input():
    with pytest.raises(ConfigError, match="TrainConfig.distributed"):
        TrainConfig(distributed="horovod")
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        TrainConfig(distributed="fsdp", checkpoint_dir="x")
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig(distributed="fsdp", amp=True)
    with pytest.raises(Exception, match="--nproc"):
        distributed.launch(0, ["run"])

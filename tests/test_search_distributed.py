"""Distributed policy search: K worker processes on one Optuna storage, no lost or duplicated
trial. The journal-file storage needs no server; the PostgreSQL test starts a throwaway server
when Debian's ``postgresql`` package (initdb, pg_ctl) and a driver (psycopg2) are installed."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from torchslim.app.search import run_search

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _recipe(tmp_path, **search):
    src = {"task": {"name": "mnist1d", "kwargs": {"num_samples": 1200}},
           "model": {"name": "rescnn1d", "kwargs": {"width": 8}}, "seed": 0, "train": {"epochs": 1},
           "measure": {"batch_size": 16, "threads": 1},
           "search": {"budget": {"macs": "0.6x"}, "method": "random", "trials": 4, "step": 2,
                      "finetune": {"max_steps": 2, "epochs": 1}, **search}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(src))
    return path


def _check_no_loss_no_duplicate(out, n):
    trials = json.loads((out / "trials.json").read_text())
    numbers = [t["optuna_trial"] for t in trials]
    assert sorted(numbers) == list(range(n))  # every trial once: none lost, none run twice
    assert all(t["macs_ratio"] <= 0.6 + 1e-9 for t in trials)
    return trials


def test_two_worker_processes_share_a_journal_file(tmp_path):
    out = tmp_path / "out"
    assert run_search(_recipe(tmp_path, workers=2), out, log=lambda s: None) == 0
    assert (out / "search.journal").exists()
    _check_no_loss_no_duplicate(out, 4)


def _pg_bin(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_a_real_postgresql_server(tmp_path):
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (Debian package `postgresql`)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    # the server refuses to run as root: as root, run it as the package's `postgres` user, in a
    # folder that user can reach (pytest's tmp_path lives under a 0700 folder of root's)
    pgdir = Path(tempfile.mkdtemp(prefix="torchslim-pg-"))
    data, port = pgdir / "data", _free_port()
    run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
    if run_as:
        shutil.chown(pgdir, "postgres")

    def pg(*args: str) -> None:
        done = subprocess.run(run_as + list(args), capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{args[0]} failed: {done.stderr.strip()[-400:]}"

    pg(initdb, "-D", str(data), "-A", "trust", "-U", "torchslim")
    pg(pg_ctl, "-D", str(data), "-o", f"-p {port} -k {pgdir} -h 127.0.0.1", "-l", str(pgdir / "pg.log"), "-w", "start")
    try:
        url = f"postgresql+psycopg2://torchslim@127.0.0.1:{port}/postgres"
        out = tmp_path / "out"
        assert run_search(_recipe(tmp_path, workers=2, storage=url), out, log=lambda s: None) == 0
        _check_no_loss_no_duplicate(out, 4)
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, check=False)
        shutil.rmtree(pgdir, ignore_errors=True)

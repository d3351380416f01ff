"""Faults of the machine (a full disk, no permission) are one line, and leave nothing corrupt
under a final name (issue 12, point 6)."""

import errno
import os

import pytest

from torchslim.app import cli
from torchslim.core import utils


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied")])
def test_a_fault_while_writing_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch, code, words):
    def broken_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(utils.os, "fsync", broken_fsync)
    target = tmp_path / "record.json"
    rc = cli.main(["measure", "--task", "digits", "--model", "lenet300", "--batch-size", "8", "--json", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"torchslim: error: {words}"), err
    assert not target.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))

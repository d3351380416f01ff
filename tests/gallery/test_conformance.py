"""The conformance matrix: every technique x every gallery model (see cells.py for what a cell
checks). ``TORCHSLIM_WRITE_SUPPORT_TABLE=1 pytest tests/gallery`` also writes
docs/supported_models.md from the outcomes (conftest.py).

A cell that fails today for a known reason is an ``xfail(strict=False)`` with that reason, so CI
stays green while the fix lands; an XPASS means the cell is now supported: delete its entry.
"""

from __future__ import annotations

import importlib.util

import pytest

from .cells import TECHNIQUES, run_cell
from .models import GALLERY

# ----------------------------------------------------------------------------- known failures

KNOWN: dict[tuple[str, str], str] = {}


def _cells():
    for model in GALLERY:
        for tech in TECHNIQUES:
            marks = []
            if (model, tech) in KNOWN:
                marks.append(pytest.mark.xfail(reason=KNOWN[(model, tech)], strict=False))
            yield pytest.param(model, tech, marks=marks, id=f"{model}-{tech}")


@pytest.mark.parametrize(("model", "technique"), list(_cells()))
def test_cell(model: str, technique: str, record_property) -> None:
    missing = GALLERY[model].missing()
    if missing:
        pytest.skip(missing)
    for pkg in TECHNIQUES[technique].needs:
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"optional package {pkg} is not installed")
    outcome = run_cell(model, technique)
    record_property("cell_status", outcome.status)
    record_property("cell_detail", outcome.detail)

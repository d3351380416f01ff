"""Fuzz harness at CI size (issue 12, point 7): ~300 generated recipes, command lines, data files
and artifacts, each with a time limit. Bad input must end in one ``torchslim: error:`` line and
exit code 2: no traceback, no hang, no accepted nonsense, no executed pickle payload. The full
size (>= 2,000 cases) is benchmark B13 (benchmarks/b13_fuzz.py).

Failures explained by a src bug listed in harness.KNOWN_BUGS are xfail (not strict), one test per
bug; any other failure fails ``test_fuzz_no_unexplained_failures``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generators
import harness

CI_SIZES = {"recipe": 120, "cli": 60, "data": 50, "artifact": 70}
SEED = 12_7
LIMIT_S = 30.0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    seeds = root / "seeds"
    seeds.mkdir()
    cases = generators.all_cases(CI_SIZES, SEED, str(seeds))
    marker = seeds / generators.MARKER
    return [harness.run_case(c, root / f"case{i}", LIMIT_S, markers=(marker,)) for i, c in enumerate(cases)]


def _report(failed) -> str:
    return "\n".join(r.line() for r in failed[:40]) + (f"\n... {len(failed) - 40} more" if len(failed) > 40 else "")


def test_fuzz_covers_every_category(results):
    summary = harness.summarize(results)
    assert summary["cases"] >= 290
    for cat, n in CI_SIZES.items():
        assert summary["by_category"][cat]["cases"] >= n * 0.9
        assert summary["by_category"][cat].get("expect_invalid", 0) > 0
    assert summary["outcomes"].get("refused", 0) > 100 and summary["outcomes"].get("accepted", 0) > 10


def test_fuzz_no_unexplained_failures(results):
    failed = [r for r in results if r.verdict != "ok" and not harness.known_bug(r)]
    assert not failed, f"{len(failed)} fuzz failures (traceback / hang / accepted nonsense / refused valid):\n" + _report(failed)


def test_pickle_payload_never_executes(results):
    evil = [r for r in results if "evil" in r.case.kind or "python-tag" in r.case.kind]
    assert evil and all(r.outcome == "refused" for r in evil), _report([r for r in evil if r.outcome != "refused"])


@pytest.mark.parametrize("bug", [d for d, _ in harness.KNOWN_BUGS],
                         ids=[f"bug{i}-{d.split()[0].strip(':')}" for i, (d, _) in enumerate(harness.KNOWN_BUGS, 1)])
def test_known_src_bug(results, bug):
    hit = [r for r in results if harness.known_bug(r) == bug]
    if hit:
        pytest.xfail(f"{bug} ({len(hit)} cases, e.g. {hit[0].case.label()[:200]})")


def test_fresh_process_same_verdict(tmp_path):
    """A case in a real interpreter: real stderr and exit code, and a wall-clock kill."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    picked = [c for c in generators.recipe_cases(40, SEED) if c.kind == "text-alias-bomb"]
    assert picked
    for i, case in enumerate(picked):
        r = harness.run_case_subprocess(case, tmp_path / f"p{i}", limit=60.0, markers=(seeds / generators.MARKER,))
        assert r.verdict == "ok" and r.outcome == "refused", r.line()
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

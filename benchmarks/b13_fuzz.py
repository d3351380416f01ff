"""B13: the fuzz harness at full size (issue 12, point 7): >= 2,000 generated recipes, command
lines, data files and artifacts through ``torchslim.app.cli.main``, each with a time limit, plus a
sample in fresh processes (real stderr, real exit code, wall-clock kill). Nothing is trained:
each command stops at its first training step or measurement (tests/fuzz/harness.py).

Headline: cases, tracebacks, hangs, accepted nonsense (a case the oracle calls invalid that was
accepted). Failures explained by a known src bug (harness.KNOWN_BUGS) are still counted in the
headline and listed under ``known_bugs``; ``failures`` lists the unexplained ones.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fuzz"))
sys.path.insert(0, str(HERE.parent / "src"))

ID = "B13"
TITLE = "fuzz harness: recipes, CLI arguments, data files, artifacts"
HEADLINE = ["cases", "tracebacks", "hangs", "accepted_nonsense"]

FULL = {"recipe": 900, "cli": 400, "data": 350, "artifact": 450}
QUICK = {"recipe": 120, "cli": 60, "data": 50, "artifact": 70}
SEED = 2026
LIMIT_S = 30.0  # in-process, per case (SIGALRM)
SUBPROCESS_LIMIT_S = 60.0
SUBPROCESS_EVERY = 200  # every 200th case again in a fresh interpreter


def run(quick: bool = False) -> dict:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import generators
    import harness

    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seeds = root / "seeds"
        seeds.mkdir()
        t0 = time.perf_counter()
        cases = generators.all_cases(sizes, SEED, str(seeds))
        gen_s = time.perf_counter() - t0
        marker = seeds / generators.MARKER
        t0 = time.perf_counter()
        results = [harness.run_case(c, root / f"c{i}", LIMIT_S, markers=(marker,)) for i, c in enumerate(cases)]
        run_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fresh = [harness.run_case_subprocess(c, root / f"p{i}", SUBPROCESS_LIMIT_S, markers=(marker,))
                 for i, c in enumerate(cases[::SUBPROCESS_EVERY]) if c.expect != "valid"]
        fresh_s = time.perf_counter() - t0
    summary = harness.summarize(results)
    sub = harness.summarize(fresh)
    return {
        **{k: summary[k] for k in ("cases", "tracebacks", "hangs", "accepted_nonsense")},
        "refused_valid": summary["refused_valid"],
        "executed_payloads": summary["executed_payloads"],
        "known_bug_cases": summary["known_bug_cases"],
        "unexplained_failures": len(summary["failures"]),
        "sizes": sizes, "seed": SEED, "time_limit_s": LIMIT_S, "generator_kinds": summary["kinds"],
        "outcomes": summary["outcomes"], "by_category": summary["by_category"],
        "fresh_process": {k: sub[k] for k in ("cases", "tracebacks", "hangs", "accepted_nonsense", "outcomes")}
        | {"failures": sub["failures"], "seconds": round(fresh_s, 1)},
        "known_bugs": summary["known_bugs"], "failures": summary["failures"],
        "warned_cases": summary["warned_cases"], "warnings": summary["warnings"],
        "seconds": {"generate": round(gen_s, 1), "run": round(run_s, 1),
                    "per_case_ms": round(1000 * run_s / max(1, len(results)), 1),
                    "slowest_case": summary["slowest_seconds"]},
    }

"""Run benchmarks by id and regenerate the table in benchmarks/README.md.

    python benchmarks/run.py B6            # one
    python benchmarks/run.py B1 B5         # several
    python benchmarks/run.py all           # every registered benchmark
    python benchmarks/run.py --table       # only rebuild the README table from results/*.json

Each benchmark is a module ``benchmarks/b<N>_<name>.py`` with ``ID = "B<N>"``, ``TITLE``,
``HEADLINE`` (the headline keys, see ../shared/BENCHMARKS.md) and ``run(quick: bool) -> dict``.
The runner adds machine facts (CPU, ISA facts from torchslim.core.isa, threads, versions, date) and
writes results/<ID>-<isa>.json atomically: one file per (benchmark, ISA), one table row each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"


def discover() -> dict[str, object]:
    mods = {}
    for path in sorted(HERE.glob("b[0-9]*_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if getattr(mod, "PART_OF", None):  # measures part of another benchmark's file: run it directly
            continue
        mods[mod.ID] = mod
    return mods


def machine() -> dict[str, object]:
    """Where a result was measured: CPU model, ISA facts (torchslim.core.isa), threads, versions."""
    import torch

    sys.path.insert(0, str(HERE.parent / "src"))
    from torchslim.core.isa import machine_facts

    facts = machine_facts()
    return {
        **facts,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def result_path(bid: str, isa: str) -> Path:
    """results/<ID>-<isa>.json: one file per (benchmark, ISA), so figures from a VNNI machine and
    from an AVX2-only one stand side by side instead of overwriting each other."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from torchslim.core.isa import isa_slug

    return RESULTS / f"{bid}-{isa_slug(isa)}.json"


def write_result(bid: str, result: dict, parts: tuple[str, ...] = ()) -> Path:
    """Write the run's result; ``parts`` (a benchmark module's PARTS) name keys that a separate
    script measures into the same file (B9's and B10's MiniLM parts: benchmarks/b9_minilm.py,
    b10_minilm.py): a run that does not produce them keeps the ones already in the file."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from torchslim.core.utils import atomic_write_text

    path = result_path(bid, result["machine"]["isa"])
    if parts and path.exists():
        old = json.loads(path.read_text())
        result = {**result, **{k: old[k] for k in parts if k in old and result.get(k) is None}}
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False, default=float) + "\n")
    return path


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def _order(path: Path) -> tuple[int, str]:
    bid, _, isa = path.stem.partition("-")
    return int(bid[1:]) if bid[1:].isdigit() else 999, isa


_MISSING = object()


def _get(data: dict, key: str, default: object = None) -> object:
    """data[key]; a dotted key reads into a part ("minilm.batch1_speedup")."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


def table(mods: dict[str, object]) -> str:
    rows = ["| id | ISA | benchmark | headline | measured on | date |", "|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("B*.json"), key=_order):
        data = json.loads(path.read_text())
        bid = data.get("id") or path.stem.partition("-")[0]
        mod = mods.get(bid)
        keys = getattr(mod, "HEADLINE", [k for k, v in data.items() if isinstance(v, (int, float))][:5])
        head = "; ".join(f"{k} = {fmt(v)}" for k in keys if (v := _get(data, k, _MISSING)) is not _MISSING)
        m = data.get("machine", {})
        threads = next((data[k] for k in ("latency_threads", "threads", "torch_threads_used") if k in data),
                       m.get("torch_threads", "?"))
        where = f"{m.get('cpu', '?')}, {threads} torch thread{'s' if threads != 1 else ''}"
        title = getattr(mod, "TITLE", data.get("title", ""))
        quick = " (quick)" if data.get("quick") else ""
        isa = m.get("isa", "?") + (" ¹" if m.get("isa_note") else "")
        rows.append(f"| {bid} | {isa} | {title}{quick} | {head} | {where} | {m.get('date', '')[:10]} |")
    if any(json.loads(p.read_text()).get("machine", {}).get("isa_note") for p in RESULTS.glob("B*.json")):
        rows.append("")
        rows.append("¹ measured before results recorded ISA facts; the machine had AVX-512 VNNI (issue 9).")
    return "\n".join(rows)


def write_table(mods: dict[str, object]) -> None:
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text:
        text += f"\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = f"{head}{TABLE_START}\n{table(mods)}\n{TABLE_END}{tail}"
    sys.path.insert(0, str(HERE.parent / "src"))
    from torchslim.core.utils import atomic_write_text

    atomic_write_text(README, new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ids", nargs="*", help="benchmark ids (B1 ... B7) or 'all'")
    ap.add_argument("--quick", action="store_true", help="smaller budgets (smoke run; marked in the table)")
    ap.add_argument("--table", action="store_true", help="only regenerate the README table")
    args = ap.parse_args(argv)
    mods = discover()
    ids = sorted(mods) if args.ids == ["all"] else [i.upper() for i in args.ids]
    unknown = [i for i in ids if i not in mods]
    if unknown:
        print(f"unknown benchmark id {unknown[0]!r}; known: {', '.join(sorted(mods))}", file=sys.stderr)
        return 2
    for bid in [] if args.table else ids:
        start = time.perf_counter()
        print(f"[{bid}] {mods[bid].TITLE} ...", flush=True)
        result = mods[bid].run(quick=args.quick)
        result = {"id": bid, "title": mods[bid].TITLE, "quick": args.quick, **result,
                  "wall_seconds": round(time.perf_counter() - start, 2),
                  "machine": {**machine(), **result.get("machine", {})}}  # a benchmark's own facts win
        print(f"[{bid}] wrote {write_result(bid, result, getattr(mods[bid], 'PARTS', ()))}", flush=True)
    write_table(mods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run benchmarks by id and regenerate the table in benchmarks/README.md.

    python benchmarks/run.py B6            # one
    python benchmarks/run.py B1 B5         # several
    python benchmarks/run.py all           # every registered benchmark
    python benchmarks/run.py --table       # only rebuild the README table from results/*.json

Each benchmark is a module ``benchmarks/b<N>_<name>.py`` with ``ID = "B<N>"``, ``TITLE``,
``HEADLINE`` (the headline keys, see ../shared/BENCHMARKS.md) and ``run(quick: bool) -> dict``.
The runner adds machine facts (threads, CPU, versions, date) and writes results/<ID>.json
atomically.
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
        mods[mod.ID] = mod
    return mods


def machine() -> dict[str, object]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(bid: str, result: dict) -> Path:
    sys.path.insert(0, str(HERE.parent / "src"))
    from torchslim.utils import atomic_write_text

    path = RESULTS / f"{bid}.json"
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False, default=float) + "\n")
    return path


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def table(mods: dict[str, object]) -> str:
    rows = ["| id | benchmark | headline | measured on | date |", "|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("B*.json")):
        data = json.loads(path.read_text())
        bid = path.stem
        mod = mods.get(bid)
        keys = getattr(mod, "HEADLINE", [k for k, v in data.items() if isinstance(v, (int, float))][:5])
        head = "; ".join(f"{k} = {fmt(data.get(k))}" for k in keys if k in data)
        m = data.get("machine", {})
        threads = next((data[k] for k in ("latency_threads", "threads", "torch_threads_used") if k in data),
                       m.get("torch_threads", "?"))
        where = f"{m.get('cpu', '?')}, {threads} torch thread{'s' if threads != 1 else ''}"
        title = getattr(mod, "TITLE", data.get("title", ""))
        quick = " (quick)" if data.get("quick") else ""
        rows.append(f"| {bid} | {title}{quick} | {head} | {where} | {m.get('date', '')[:10]} |")
    return "\n".join(rows)


def write_table(mods: dict[str, object]) -> None:
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text:
        text += f"\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = f"{head}{TABLE_START}\n{table(mods)}\n{TABLE_END}{tail}"
    sys.path.insert(0, str(HERE.parent / "src"))
    from torchslim.utils import atomic_write_text

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
                  "wall_seconds": round(time.perf_counter() - start, 2), "machine": machine()}
        print(f"[{bid}] wrote {write_result(bid, result)}", flush=True)
    write_table(mods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

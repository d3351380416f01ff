"""The measurement table printed by the CLI and the demo (rich), from Records."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

# Rows are torchslim.core.measure.Record objects; not imported here, so that measure.py can re-export
# format_records without an import cycle.
Record = Any


def _si(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _speed_cells(r: Record, first: Record, base: dict | None) -> list[str]:
    """Speedup per runtime: the interleaved ratio when the row has one (p10-based under load,
    marked *), else the ratio of separately timed medians (marked ~)."""
    cells = []
    for rt, v in r.latency.items():
        if rt in r.speedup:
            mark = "*" if r.speedup_basis == "p10" else ""
            cells.append(f"{r.speedup[rt]:.2f}×{mark}")
        elif r is first:
            cells.append("1.00×" if rt == next(iter(r.latency)) else f"{base['median_ms'] / v['median_ms']:.2f}×")
        else:
            cells.append(f"~{base['median_ms'] / v['median_ms']:.2f}×" if base else "-")
    return cells


@functools.lru_cache(maxsize=1)
def _table_class():
    """rich's Table, printing as text: ``print(format_records(rows))`` shows the table (plain
    text, the width of the terminal or 160 columns), not ``<rich.table.Table object>``;
    ``console.print(table)`` still renders it with colour."""
    from rich.table import Table

    class MeasureTable(Table):
        def __str__(self) -> str:
            import io
            import shutil

            from rich.console import Console

            width = shutil.get_terminal_size((160, 24)).columns
            buf = io.StringIO()
            Console(file=buf, width=max(width, 100), force_terminal=False, color_system=None,
                    legacy_windows=False).print(self)
            return buf.getvalue().rstrip("\n")

    return MeasureTable


def format_records(records: Sequence[Record]):
    """A rich Table of records (``str()`` of it is the table as text); size is relative to the
    first record. Speedup is the row's own interleaved measurement against the reference when
    it has one (``measure(reference=)``), else relative to the first record's first runtime.
    Rows with timing warnings are marked ⚠ and the warnings are listed in the caption."""
    Table = _table_class()
    names = {r.metric_name for r in records if r.metric is not None}
    metric_col = names.pop() if len(names) == 1 else "metric"
    machine = next((r.machine for r in records if r.machine), {})
    title = "torchslim measurements"
    if machine:
        title += f" — {machine.get('cpu', '?')}, {machine.get('isa', '?')}, {machine.get('threads', '?')} thread(s)"
    table = Table(title=title)
    for col in ("stage", metric_col, "params", "nonzeros", "KB (×)", "MACs", "latency ms (runtime)", "speedup"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    if not records:
        return table
    first = records[0]
    base = next(iter(first.latency.values()), None)
    warned = []
    for r in records:
        metric = "-" if r.metric is None else f"{r.metric:.4f}"
        if metric_col == "metric" and r.metric is not None:
            metric = f"{r.metric_name} {metric}"
        ratio = f"{first.bytes / r.bytes:.1f}×" if r.bytes else "-"
        lat = [f"{v['median_ms']:.3f} {r.runtime_labels.get(rt, rt)}" for rt, v in r.latency.items()]
        speed = _speed_cells(r, first, base)
        if r.flags:
            metric = f"{metric} ⚑"
            warned.append(f"⚑ {r.stage or '-'}: {'; '.join(r.flags)}")
        if r.warnings:
            warned.append(f"⚠ {r.stage or '-'}: {'; '.join(r.warnings)}")
            speed = [f"{c} ⚠" for c in speed]
        table.add_row(
            r.stage or "-",
            metric,
            f"{r.params:,}",
            f"{r.nonzeros:,}",
            f"{r.bytes / 1024:.1f} ({ratio})",
            _si(r.macs_per_sample),
            "\n".join(lat) or "-",
            "\n".join(speed) or "-",
        )
    notes = []
    if any(r.speedup for r in records):
        notes.append("speedup: timed interleaved with the baseline in the same repeats")
    if any(r.speedup_basis == "p10" for r in records):
        notes.append("* ratio of p10s (the timing was contended)")
    if any(r is not first and not r.speedup and r.latency for r in records):
        notes.append("~ timed apart from the baseline")
    if warned:
        warned.append("re-run ⚠ rows on a quiet machine before quoting them")
    table.caption = "\n".join(["; ".join(notes)] * bool(notes) + warned) or None
    return table

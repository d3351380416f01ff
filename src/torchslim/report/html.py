"""A self-contained HTML report of a run (plotly.js embedded; opens with no network)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text
from .figures import plotly_figures, save_pngs


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def stage_table(run: dict[str, Any]) -> str:
    rows = run.get("rows", [])
    if not rows:
        return "<p>No rows.</p>"
    base = rows[0]
    base_lat = next(iter(base.get("latency", {}).values()), {}).get("median_ms")
    head = ("<tr><th>stage</th><th>{m}</th><th>Δ vs baseline</th><th>params</th><th>non-zeros</th>"
            "<th>bytes</th><th>× smaller</th><th>MACs / sample</th><th>latency ms</th><th>speedup</th></tr>")
    out = [head.format(m=html.escape(base.get("metric_name") or "metric"))]
    for r in rows:
        lat = next(iter(r.get("latency", {}).values()), {}).get("median_ms")
        delta = None if r.get("metric") is None or base.get("metric") is None else r["metric"] - base["metric"]
        ratio = base["bytes"] / r["bytes"] if r.get("bytes") else None
        speed = base_lat / lat if base_lat and lat else None
        cells = [r.get("stage"), r.get("metric"), delta, r.get("params"), r.get("nonzeros"), r.get("bytes"),
                 f"{ratio:.1f}×" if ratio else None, r.get("macs_per_sample"), lat, f"{speed:.2f}×" if speed else None]
        out.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    return "<table class='stages'>" + "".join(out) + "</table>"


def machine_line(run: dict[str, Any]) -> str:
    m = run.get("machine", {})
    rows = run.get("rows", [])
    threads = rows[0].get("threads") if rows else m.get("threads")
    batch = rows[0].get("batch_size") if rows else None
    return (f"Latency measured on {html.escape(str(m.get('cpu', '?')))} with {threads} torch threads, "
            f"batch size {batch}, PyTorch eager, median of repeats.")


def render(run: dict[str, Any]) -> str:
    import plotly.io as pio

    figs = plotly_figures(run)
    divs = []
    for i, (name, fig) in enumerate(figs):
        divs.append(f"<section class='plot' data-plot='{html.escape(name)}'>"
                    + pio.to_html(fig, full_html=False, include_plotlyjs="inline" if i == 0 else False,
                                  div_id=f"plot-{i}") + "</section>")
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    title = html.escape(run.get("name") or "torchslim run")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table.stages {{ border-collapse: collapse; margin: 1em 0; }}
table.stages td, table.stages th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
table.stages td:first-child, table.stages th:first-child {{ text-align: left; }}
.machine {{ color: #555; }}
</style></head><body>
<h1>{title}</h1>
<p class="machine">{machine_line(run)}</p>
<p class="machine">Seed {run.get('seed')}; {html.escape(versions)}; total {run.get('seconds', '?')} s.</p>
<h2>Stages</h2>
{stage_table(run)}
<h2>Trade-offs</h2>
{''.join(divs)}
<h2>Recipe</h2>
<pre>{html.escape(json.dumps(run.get('recipe', {}), indent=2))}</pre>
</body></html>
"""


def write_report(run_json: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html (and PNGs) next to run.json, or to ``out``."""
    from ..errors import TorchslimError

    path = Path(run_json)
    if not path.is_file():
        raise TorchslimError(f"report: {str(path)!r} does not exist (give the run.json of a `torchslim run`)")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TorchslimError(f"report: {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(run, dict) or not isinstance(run.get("rows"), list):
        raise TorchslimError(f"report: {str(path)!r} has no 'rows' list; is it a torchslim run.json?")
    target = Path(out) if out else path.with_name("report.html")
    atomic_write_text(target, render(run))
    save_pngs(run, target.parent)
    return target

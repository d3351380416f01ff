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


def _speed(r: dict[str, Any], base_lat: float | None, lat: float | None, first: bool) -> str | None:
    """The row's interleaved speedup vs the baseline if it has one (``*`` = ratio of p10s, the
    timing was contended), else the ratio of separately timed medians (``~``)."""
    speedup = r.get("speedup") or {}
    if speedup:
        value = next(iter(speedup.values()))
        return f"{value:.2f}×" + ("*" if r.get("speedup_basis") == "p10" else "")
    if first:
        return "1.00×" if lat else None
    return f"~{base_lat / lat:.2f}×" if base_lat and lat else None


def stage_table(run: dict[str, Any]) -> str:
    rows = run.get("rows", [])
    if not rows:
        return "<p>No rows.</p>"
    base = rows[0]
    base_lat = next(iter(base.get("latency", {}).values()), {}).get("median_ms")
    head = ("<tr><th>stage</th><th>{m}</th><th>Δ vs baseline</th><th>params</th><th>non-zeros</th>"
            "<th>bytes</th><th>× smaller</th><th>MACs / sample</th><th>latency ms</th><th>runtime</th>"
            "<th>speedup</th><th>p10–p90 ms</th></tr>")
    out = [head.format(m=html.escape(base.get("metric_name") or "metric"))]
    warnings = []
    for i, r in enumerate(rows):
        rt, timing = next(iter(r.get("latency", {}).items()), (None, {}))
        lat = timing.get("median_ms")
        delta = None if r.get("metric") is None or base.get("metric") is None else r["metric"] - base["metric"]
        ratio = base["bytes"] / r["bytes"] if r.get("bytes") else None
        speed = _speed(r, base_lat, lat, i == 0)
        if r.get("flags"):
            warnings += [f"⚑ {r.get('stage')}: {w}" for w in r["flags"]]
        if r.get("warnings"):
            warnings += [f"{r.get('stage')}: {w}" for w in r["warnings"]]
            speed = f"{speed} ⚠" if speed else "⚠"
        spread = f"{timing['p10_ms']:.3g}–{timing['p90_ms']:.3g}" if "p10_ms" in timing else None
        label = (r.get("runtime_labels") or {}).get(rt, rt)
        stage = f"{r.get('stage')} ⚑" if r.get("flags") else r.get("stage")
        cells = [stage, r.get("metric"), delta, r.get("params"), r.get("nonzeros"), r.get("bytes"),
                 f"{ratio:.1f}×" if ratio else None, r.get("macs_per_sample"), lat, label, speed, spread]
        out.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    notes = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    legend = ("<p class='machine'>Speedup: timed interleaved with the baseline in the same repeats; "
              "* ratio of p10s (contended timing); ~ timed apart from the baseline.</p>")
    return ("<table class='stages'>" + "".join(out) + "</table>" + legend
            + (f"<ul class='warnings'>{notes}</ul>" if notes else ""))


def machine_line(run: dict[str, Any]) -> str:
    m = run.get("machine", {})
    rows = run.get("rows", [])
    threads = rows[0].get("threads") if rows else m.get("threads")
    batch = rows[0].get("batch_size") if rows else None
    labels = sorted({lab for r in rows for lab in (r.get("runtime_labels") or {}).values()}) or ["PyTorch eager"]
    isa = m.get("isa") or (rows[0].get("machine", {}).get("isa") if rows else None) or "ISA not recorded"
    return (f"Latency measured on {html.escape(str(m.get('cpu', '?')))} ({html.escape(str(isa))}) with "
            f"{threads} torch threads, batch size {batch}, {html.escape(', '.join(labels))}, median of repeats.")


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
.warnings {{ color: #a40; }}
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
        run = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise TorchslimError(f"report: {str(path)!r} is not UTF-8 text; is it a torchslim run.json?") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        why = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "nested too deep"
        raise TorchslimError(f"report: {str(path)!r} is not valid JSON ({why})") from None
    if isinstance(run, dict) and run.get("kind") == "online" and isinstance(run.get("compression"), dict):
        # torchslim online: the compression run's rows, plus the stream's accuracy curve
        run = {**run["compression"], "online": run.get("online"), "name": f"{run['compression'].get('name') or 'run'} (online)"}
    rows = run.get("rows") if isinstance(run, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TorchslimError(f"report: {str(path)!r} has no 'rows' list of stage rows; is it a torchslim run.json?")
    target = Path(out) if out else path.with_name("report.html")
    atomic_write_text(target, render(run))
    save_pngs(run, target.parent)
    return target

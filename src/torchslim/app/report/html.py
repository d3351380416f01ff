"""A self-contained HTML report of a run: opens with no network and stays well under 1 MB.

The figures are static SVG drawn by matplotlib and written inline (``charts.py`` says why),
with the same figures as PNG files beside the page; the table gives deltas as a reader wants
them ("−0.4 pt", "−62 % bytes", "1.8×"). Needs the ``report`` extra (matplotlib)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ...core.utils import atomic_write_text
from . import fmt
from .figures import figures, save_pngs, slug

FIGURE_BUDGET = 850_000  # characters of inline SVG; the table and recipe take the rest of 1 MB


def _cell(v: Any, nd: int = 4) -> str:
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


def _with_change(value: Any, base: Any, what: str = "") -> str | None:
    """"1,234 (−62 %)": a count and its change against the baseline's."""
    if value is None:
        return None
    change = fmt.percent_change(value, base, what)
    return f"{fmt.count(value)} ({change})" if change and value != base else fmt.count(value)


def stage_table(run: dict[str, Any]) -> str:
    rows = run.get("rows", [])
    if not rows:
        return "<p>No rows.</p>"
    base = rows[0]
    base_lat = next(iter((base.get("latency") or {}).values()), {}).get("median_ms")
    name = base.get("metric_name") or "metric"
    points = fmt.is_fraction_metric(name, [r.get("metric") for r in rows])
    head = ("<tr><th>stage</th><th>{m}</th><th>Δ vs baseline</th><th>params</th><th>non-zeros</th>"
            "<th>size</th><th>Δ size</th><th>× smaller</th><th>MACs / sample</th><th>latency ms</th><th>runtime</th>"
            "<th>speedup</th><th>p10–p90 ms</th></tr>")
    out = [head.format(m=html.escape(name))]
    warnings = []
    for i, r in enumerate(rows):
        rt, timing = next(iter((r.get("latency") or {}).items()), (None, {}))
        lat = timing.get("median_ms")
        delta = None if r.get("metric") is None or base.get("metric") is None else r["metric"] - base["metric"]
        smaller = base["bytes"] / r["bytes"] if r.get("bytes") and base.get("bytes") else None
        speed = _speed(r, base_lat, lat, i == 0)
        if r.get("flags"):
            warnings += [f"⚑ {r.get('stage')}: {w}" for w in r["flags"]]
        if r.get("warnings"):
            warnings += [f"{r.get('stage')}: {w}" for w in r["warnings"]]
            speed = f"{speed} ⚠" if speed else "⚠"
        spread = f"{timing['p10_ms']:.3g}–{timing['p90_ms']:.3g}" if "p10_ms" in timing and "p90_ms" in timing else None
        label = (r.get("runtime_labels") or {}).get(rt, rt)
        stage = f"{r.get('stage')} ⚑" if r.get("flags") else r.get("stage")
        first = i == 0
        metric = None if r.get("metric") is None else f"{r['metric']:.4f}"
        cells = [stage, metric, None if first else fmt.metric_delta(delta, points),
                 fmt.count(r.get("params")) if first else _with_change(r.get("params"), base.get("params")),
                 fmt.count(r.get("nonzeros")) if first else _with_change(r.get("nonzeros"), base.get("nonzeros")),
                 fmt.size(r.get("bytes")), None if first else fmt.percent_change(r.get("bytes"), base.get("bytes"), "bytes"),
                 fmt.ratio(smaller), fmt.count(r.get("macs_per_sample")), lat, label, speed, spread]
        out.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    notes = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    legend = ("<p class='machine'>Δ in points (pt) for a share such as accuracy; sizes are the bytes of the file "
              "each stage writes. Speedup: timed interleaved with the baseline in the same repeats; "
              "* ratio of p10s (contended timing); ~ timed apart from the baseline.</p>")
    return ("<div class='scroll'><table class='stages'>" + "".join(out) + "</table></div>" + legend
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


def render(run: dict[str, Any], figs: list[tuple[str, str, Any]] | None = None) -> str:
    """The report page: machine, stage table, figures as inline SVG, recipe. No script, no
    stylesheet or font from anywhere: it opens offline and stays small (``charts.py``)."""
    from .charts import to_svg

    figs = figures(run) if figs is None else figs
    sections: dict[str, list[str]] = {"trade": [], "layers": [], "other": []}
    used = 0
    for fid, caption, fig in figs:
        where = "trade" if fid == "pareto" else "layers" if fid.startswith("layers-") else "other"
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if where != "layers" else ""  # titled in the chart
        svg = to_svg(fig)
        used += len(svg)
        if used > FIGURE_BUDGET:  # a run with very many stages: the page stays under 1 MB
            svg = f"<p>{html.escape(caption)}: see {slug(fid)}.png beside this page (left out to keep it under 1 MB).</p>"
        sections[where].append(f"<figure class='plot' data-plot='{html.escape(fid)}'>{svg}{cap}</figure>")
    per_layer = "".join(sections["layers"]) or "<p>No stage recorded per-layer data.</p>"
    more = f"<h2>Schedules, sensitivity and dynamic behaviour</h2>{''.join(sections['other'])}" if sections["other"] else ""
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    title = html.escape(run.get("name") or "torchslim run")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.scroll {{ overflow-x: auto; }}
table.stages {{ border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; font-size: 0.92em; }}
table.stages td, table.stages th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
table.stages td:first-child, table.stages th:first-child {{ text-align: left; }}
figure.plot {{ margin: 1.5em 0; }}
figure.plot svg {{ max-width: 100%; height: auto; }}
figcaption {{ color: #555; font-size: 0.9em; }}
.machine {{ color: #555; }}
.warnings {{ color: #a40; }}
</style></head><body>
<h1>{title}</h1>
<p class="machine">{machine_line(run)}</p>
<p class="machine">Seed {run.get('seed')}; {html.escape(versions)}; total {run.get('seconds', '?')} s.</p>
<h2>Stages</h2>
{stage_table(run)}
<h2>Trade-offs</h2>
{''.join(sections['trade'])}
<h2>Per layer</h2>
{per_layer}
{more}
<h2>Recipe</h2>
<pre>{html.escape(json.dumps(run.get('recipe', {}), indent=2))}</pre>
</body></html>
"""


def _need_matplotlib() -> None:
    from ...core.errors import TorchslimError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TorchslimError("report: needs matplotlib, the 'report' extra: pip install 'torchslim[report]'") from None


def write_report(run_json: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html (and PNGs) next to run.json (or a search's search.json), or to ``out``."""
    from ...core.errors import TorchslimError

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
    from .search_report import is_search_summary, write_search_report

    if is_search_summary(run):  # torchslim search's search.json: every trial a point of the plot
        _need_matplotlib()
        return write_search_report(run, path.parent, Path(out) if out else None)
    if isinstance(run, dict) and run.get("kind") == "online" and isinstance(run.get("compression"), dict):
        # torchslim online: the compression run's rows, plus the stream's accuracy curve
        run = {**run["compression"], "online": run.get("online"), "name": f"{run['compression'].get('name') or 'run'} (online)"}
    rows = run.get("rows") if isinstance(run, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TorchslimError(f"report: {str(path)!r} has no 'rows' list of stage rows; is it a torchslim run.json?")
    target = Path(out) if out else path.with_name("report.html")
    _need_matplotlib()
    figs = figures(run)
    atomic_write_text(target, render(run, figs))
    save_pngs(run, target.parent, figs)
    return target

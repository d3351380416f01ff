"""The report of a policy search (``torchslim search``): every trial is a point of the Pareto plot.

``search.json`` (the summary ``app/search.write_outputs`` writes) and ``trials.json`` beside it
are read; the page shows the summary, one chart of the val metric against the budgeted cost
(latency or MACs as a share of the unpruned model) with every evaluated trial, coloured by the
policy maker that proposed it, over-budget trials hollow, the Pareto front dotted, the budget as a
vertical line and the answer starred; then the answer's policy and the trials as a table. Same
rules as the run report: static SVG inline (matplotlib), no script, nothing fetched.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ...search.trials import pareto
from .charts import GREY, new_figure, styled, to_png, to_svg
from .fmt import padded_range


def is_search_summary(data: Any) -> bool:
    return isinstance(data, dict) and {"method", "budget", "trials", "best"} <= set(data) and "rows" not in data


def cost_key(summary: dict[str, Any]) -> str:
    """The trial field the budget bounds: latency, MACs, or (a transformer search's) file size."""
    kind = summary.get("budget", {}).get("kind")
    return {"latency": "latency_ratio", "size": "size_ratio", "nonzeros": "size_ratio"}.get(kind, "macs_ratio")


def _transformer(summary: dict[str, Any]) -> bool:
    return isinstance(summary.get("space"), dict) and summary["space"].get("kind") == "transformer"


@styled
def trials_chart(trials: list[dict[str, Any]], summary: dict[str, Any]) -> Any:
    key = cost_key(summary)
    ratio = float(summary.get("budget", {}).get("ratio", 1.0))
    pts = [t for t in trials if isinstance(t.get(key), (int, float)) and isinstance(t.get("val"), (int, float))]
    fig, ax = new_figure(4.2)
    makers = sorted({t.get("maker", "?") for t in pts})
    for i, maker in enumerate(makers):
        mine = [t for t in pts if t.get("maker", "?") == maker]
        for feasible in (True, False):
            sel = [t for t in mine if bool(t.get("feasible")) == feasible]
            if sel:
                ax.scatter([t[key] for t in sel], [t["val"] for t in sel], s=30, zorder=3,
                           color=f"C{i % 10}" if feasible else "none", edgecolors=f"C{i % 10}",
                           label=f"{maker} ({len(sel)})" + ("" if feasible else " over budget"))
    front = pareto(pts, key)
    if len(front) > 1:
        ax.plot([t[key] for t in front], [t["val"] for t in front], ":", color=GREY, zorder=2, label="Pareto front")
    ax.axvline(ratio, color=GREY, linewidth=1, zorder=1)
    ax.annotate(f"budget {ratio:g}x", (ratio, 1), xycoords=("data", "axes fraction"), xytext=(4, -12),
                textcoords="offset points", fontsize=8, color=GREY)
    top = summary.get("best")
    if isinstance(top, dict) and isinstance(top.get(key), (int, float)):
        ax.scatter([top[key]], [top["val"]], s=160, marker="*", color="gold", edgecolors="black", zorder=4,
                   label="answer")
    xr = padded_range([t[key] for t in pts] + [ratio], pad=0.08)
    yr = padded_range([t["val"] for t in pts], pad=0.12)
    if xr:
        ax.set_xlim(*xr)
    if yr:
        ax.set_ylim(*yr)
    what = {"latency_ratio": "latency, measured end to end" if _transformer(summary) else "measured-latency table",
            "size_ratio": "file size"}.get(key, "MACs")
    ax.set_xlabel(f"cost ({what}) as a share of the unpruned model")
    ax.set_ylabel("val metric")
    ax.set_title(f"{len(pts)} trials of a {summary.get('method', '?')} search")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    key = cost_key(summary)
    top = summary.get("best") or {}
    rows = [("method", str(summary.get("method"))),
            ("budget", f"{summary.get('budget', {}).get('kind')} <= {summary.get('budget', {}).get('ratio')}x"),
            ("trials", str(summary.get("trials"))), ("seconds", str(summary.get("seconds")))]
    if top:
        rows += [("answer: val", f"{top.get('val', float('nan')):.4f}"),
                 ("answer: test", f"{top.get('test', float('nan')):.4f}"),
                 (f"answer: {key.replace('_', ' ')} ({'in the search' if _transformer(summary) else 'predicted'})",
                  f"{top.get(key, float('nan')):.3f}x")]
    if summary.get("measured_latency_ratio") is not None:
        rows.append(("answer: latency measured end to end", f"{summary['measured_latency_ratio']:.3f}x"))
    if not top:
        rows.append(("answer", "no policy within the budget was found"))
    return rows


def render_search(summary: dict[str, Any], trials: list[dict[str, Any]], svg: str) -> str:
    key = cost_key(summary)
    machine = summary.get("machine", {})
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(summary))
    body = "".join(
        f"<tr><td>{t.get('index', i)}</td><td>{html.escape(str(t.get('maker', '?')))}</td>"
        f"<td>{t.get('val', float('nan')):.4f}</td><td>{t.get('test', float('nan')):.4f}</td>"
        f"<td>{t.get(key, float('nan')):.3f}</td><td>{'yes' if t.get('feasible') else 'no'}</td></tr>"
        for i, t in enumerate(trials))
    best = summary.get("best") or {}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>torchslim search</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; font-size: 0.92em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ text-align: left; }}
figure svg {{ max-width: 100%; height: auto; }}
.machine {{ color: #555; }}
</style></head><body>
<h1>torchslim search: {html.escape(str(summary.get('method')))}</h1>
<p class="machine">{html.escape(str(machine.get('cpu', '?')))}, {html.escape(str(machine.get('isa', '?')))},
{html.escape(str(machine.get('threads', '?')))} torch threads</p>
<table>{head}</table>
<h2>Every trial</h2>
<figure class="plot" data-plot="search-pareto">{svg}<figcaption>Each point is one evaluated policy (hollow: over
the budget); dotted: the Pareto front; star: the answer (the best trial that held the budget).</figcaption></figure>
<h2>The answer's policy</h2>
<pre>{html.escape(json.dumps(best.get('policy'), indent=2))}</pre>
<h2>Trials</h2>
<table><tr><th>#</th><th>maker</th><th>val</th><th>test</th><th>{html.escape(key)}</th><th>within budget</th></tr>{body}</table>
</body></html>
"""


def write_search_report(summary: dict[str, Any], folder: Path, target: Path | None = None) -> Path:
    """report.html (and search-pareto.png) for the search whose outputs are in ``folder``."""
    from ...core.errors import TorchslimError
    from ...core.utils import atomic_write_text

    path = folder / "trials.json"
    try:
        trials = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TorchslimError(f"report: {str(path)!r} is missing or not JSON (a search writes it beside search.json)") from None
    if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
        raise TorchslimError(f"report: {str(path)!r} is not a list of trial records")
    fig = trials_chart(trials, summary)
    target = target or folder / "report.html"
    atomic_write_text(target, render_search(summary, trials, to_svg(fig)))
    to_png(fig, target.parent / "search-pareto.png")
    return target

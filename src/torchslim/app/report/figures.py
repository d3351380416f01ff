"""Figures of a run: the Pareto panels, per-layer charts, pruning schedules, sensitivity curves,
and the dynamic techniques' figures (``dynamic_figures.py``).

The series are plain data computed here (and in ``layers.py``) from run.json rows; ``charts.py``
draws them, once, into figures that become both the inline SVG and the PNG files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fmt import is_fraction_metric
from .layers import layer_charts, schedule_series


def points(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per row (stage or search trial): metric, size KB, eager latency ms."""
    pts = []
    for row in run.get("rows", []):
        lat = next(iter((row.get("latency") or {}).values()), {}) or {}
        pts.append({"name": row.get("stage", "?"), "metric": row.get("metric"), "kb": (row.get("bytes") or 0) / 1024,
                    "ms": lat.get("median_ms"), "kind": row.get("kind", "stage")})
    return pts


def pareto(pts: list[dict[str, Any]], x: str) -> list[dict[str, Any]]:
    """Points not dominated in (smaller x, higher metric), sorted by x."""
    valid = [p for p in pts if p.get(x) is not None and p.get("metric") is not None]
    front, best = [], float("-inf")
    for p in sorted(valid, key=lambda p: (p[x], -p["metric"])):
        if p["metric"] > best:
            front.append(p)
            best = p["metric"]
    return front


def layer_series(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-layer charts as plain series: [{stage, technique, key, layers, values}]."""
    return [{"stage": c.stage, "technique": c.technique, "key": next(iter(c.series)), "layers": c.layers,
             "values": next(iter(c.series.values()))} for c in layer_charts(run)]


def sensitivity_series(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Sensitivity tables ([{layer, sparsity, metric}, ...]) found in stage infos, per layer."""
    out = []
    for row in run.get("rows", []):
        table = (row.get("info") or {}).get("sensitivity")
        if not isinstance(table, list):
            continue
        by_layer: dict[str, list[tuple[float, float]]] = {}
        for r in table:
            if isinstance(r, dict) and {"layer", "sparsity", "metric"} <= set(r):
                by_layer.setdefault(str(r["layer"]), []).append((float(r["sparsity"]), float(r["metric"])))
        for layer, xy in by_layer.items():
            xy.sort()
            out.append({"stage": row.get("stage"), "layer": layer, "x": [a for a, _ in xy], "y": [b for _, b in xy]})
    return out


def metric_name(run: dict[str, Any]) -> str:
    return next((r.get("metric_name") for r in run.get("rows", []) if r.get("metric_name")), "metric")


def figures(run: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(id, caption, matplotlib Figure) for every figure of the run, in page order."""
    from . import charts
    from .dynamic_figures import dynamic_figures

    pts, name = points(run), metric_name(run)
    fraction = is_fraction_metric(name, [p["metric"] for p in pts])
    out = []
    if any(p.get("metric") is not None for p in pts):
        fronts = {x: pareto(pts, x) for x in ("kb", "ms")}
        out.append(("pareto", "Trade-offs: every stage's metric against its file size and its latency",
                    charts.pareto_chart(pts, fronts, name, fraction)))
    for c in layer_charts(run):
        out.append((c.id, c.title, charts.bar_chart(c)))
    for s in schedule_series(run):
        fig = charts.line_chart(f"{s['stage']}: gradual pruning schedule", "optimizer step", "target sparsity",
                                [{"name": "sparsity", "x": s["x"], "y": s["y"], "markers": True}], fraction=True)
        out.append((f"schedule-{s['stage']}", f"{s['stage']}: sparsity raised along the cubic schedule", fig))
    sens = sensitivity_series(run)
    if sens:
        lines = [{"name": s["layer"], "x": s["x"], "y": s["y"], "markers": True} for s in sens]
        fig = charts.line_chart("sensitivity: metric vs one layer's sparsity (others dense)", "sparsity", name, lines,
                                fraction=fraction)
        out.append(("sensitivity", "Sensitivity of each layer to pruning", fig))
    return out + [(fid, cap, fig) for fid, cap, fig in dynamic_figures(run, with_captions=True)]


def save_pngs(run: dict[str, Any], out_dir: Path, figs: list[tuple[str, str, Any]] | None = None) -> list[str]:
    """The same figures as PNG files (pareto.png, layers-<stage>-<technique>.png, ...)."""
    from ...core.utils import atomic_write
    from .charts import to_png

    paths = []
    for fid, _, fig in figs if figs is not None else figures(run):
        path = Path(out_dir) / f"{slug(fid)}.png"
        atomic_write(path, lambda p, f=fig: to_png(f, p))
        paths.append(str(path))
    return paths


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)

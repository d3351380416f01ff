"""Figures of a run: Pareto fronts, per-layer bars, sensitivity curves (plotly and matplotlib).

Both renderers read the same plain series computed here from run.json rows, so the HTML and
the PNGs always show the same numbers.
"""

from __future__ import annotations

from typing import Any

LAYER_VALUE_KEYS = ("sparsity", "bits", "kept_fraction", "rank")


def points(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per row (stage or search trial): metric, size KB, eager latency ms."""
    pts = []
    for row in run.get("rows", []):
        lat = next(iter(row.get("latency", {}).values()), {}) or {}
        pts.append({"name": row.get("stage", "?"), "metric": row.get("metric"), "kb": row.get("bytes", 0) / 1024,
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
    """Per-layer values found in stage infos: [{stage, key, layers: [...], values: [...]}]."""
    series = []
    for row in run.get("rows", []):
        for key, value in (row.get("info") or {}).items():
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                value = [{"layer": name, **v} for name, v in value.items()]  # {layer: {...}} form
            if key == "sensitivity" or not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
                continue
            name_key = next((k for k in ("layer", "name", "module") if k in value[0]), None)
            val_key = next((k for k in LAYER_VALUE_KEYS if k in value[0] and isinstance(value[0][k], (int, float))), None)
            if name_key and val_key:
                series.append({"stage": row.get("stage"), "key": val_key, "source": key,
                               "layers": [str(v[name_key]) for v in value],
                               "values": [float(v.get(val_key) or 0) for v in value]})
    return series


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


def plotly_figures(run: dict[str, Any]) -> list[Any]:
    import plotly.graph_objects as go

    pts = points(run)
    metric_name = next((r.get("metric_name") for r in run.get("rows", []) if r.get("metric_name")), "metric")
    figs = []
    for x, label in (("kb", "size (KB, log)"), ("ms", "latency (ms per batch, eager)")):
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=[p[x] for p in pts], y=[p["metric"] for p in pts], mode="markers+text",
                                 text=[p["name"] for p in pts], textposition="top center", name="stages"))
        front = pareto(pts, x)
        fig.add_trace(go.Scatter(x=[p[x] for p in front], y=[p["metric"] for p in front], mode="lines",
                                 name="Pareto front", line={"dash": "dot"}))
        fig.update_layout(title=f"{metric_name} vs {label}", xaxis_title=label, yaxis_title=metric_name,
                          xaxis_type="log" if x == "kb" else "linear", height=420)
        figs.append(("pareto-" + x, fig))
    for s in layer_series(run):
        fig = go.Figure(go.Bar(x=s["layers"], y=s["values"], name=s["key"]))
        fig.update_layout(title=f"per-layer {s['key']} after {s['stage']}", yaxis_title=s["key"], height=360)
        figs.append((f"layers-{s['stage']}-{s['key']}", fig))
    sens = sensitivity_series(run)
    if sens:
        fig = go.Figure([go.Scatter(x=s["x"], y=s["y"], mode="lines+markers", name=s["layer"]) for s in sens])
        fig.update_layout(title="sensitivity: metric vs layer sparsity (others dense)", xaxis_title="sparsity",
                          yaxis_title=metric_name, height=400)
        figs.append(("sensitivity", fig))
    from .dynamic_figures import dynamic_figures

    return figs + dynamic_figures(run)


def save_pngs(run: dict[str, Any], out_dir) -> list[str]:
    """The same figures as PNG files (matplotlib, no browser needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_write

    pts, paths = points(run), []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (x, label) in zip(axes, (("kb", "size (KB)"), ("ms", "latency (ms, eager)"))):
        valid = [p for p in pts if p.get(x) is not None and p["metric"] is not None]
        ax.scatter([p[x] for p in valid], [p["metric"] for p in valid])
        for p in valid:
            ax.annotate(p["name"], (p[x], p["metric"]), fontsize=8)
        front = pareto(pts, x)
        ax.plot([p[x] for p in front], [p["metric"] for p in front], ":", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("metric")
        if x == "kb":
            ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    path = out_dir / "pareto.png"
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    paths.append(str(path))
    for s in layer_series(run):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.bar(range(len(s["values"])), s["values"])
        ax.set_xticks(range(len(s["layers"])), s["layers"], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"per-layer {s['key']} after {s['stage']}")
        fig.tight_layout()
        path = out_dir / f"layers-{_slug(str(s['stage']))}-{s['key']}.png"
        atomic_write(path, lambda p, f=fig: f.savefig(p, format="png", dpi=110))
        plt.close(fig)
        paths.append(str(path))
    return paths


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)

"""Per-layer charts, one per technique whose stage info has per-layer data (plain data here; the
drawing is in ``charts.py``).

Each reader below knows one technique's ``info`` (what its ``apply`` records) and returns a
``LayerChart``: one or two series of values per layer, a text on each bar ("8/16", "int4",
"82 %") and which bars to mark (a float layer, a removed block, a layer kept whole). The first
reader that recognises an info wins; an info none of them knows falls back to the generic
per-layer reader (any ``[{layer, sparsity|bits|kept_fraction|rank}]`` list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fmt import short_names

GENERIC_KEYS = ("sparsity", "bits", "kept_fraction", "rank")
MAX_BARS = 80  # a chart shows at most this many layers (the rest stay in run.json; the title says so)


@dataclass
class LayerChart:
    stage: str
    technique: str
    title: str
    axis: str  # what the value axis shows
    layers: list[str]
    series: dict[str, list[float]]  # legend name -> one value per layer
    labels: dict[str, list[str]] = field(default_factory=dict)  # text on each bar, per series
    marked: list[bool] = field(default_factory=list)  # bars drawn in the warning colour
    marked_means: str = ""
    limits: tuple[float, float] | None = None
    percent: bool = False  # values are fractions shown as percent
    prefix: str = ""  # the common layer-name prefix left out of the labels

    @property
    def id(self) -> str:
        return f"layers-{self.stage}-{self.technique}"


def _items(value: Any) -> list[dict[str, Any]] | None:
    """info['layers'] as a list of dicts with a 'layer' key ({name: {...}} or [{layer: ...}])."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return [{"layer": str(k), **v} for k, v in value.items()]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        key = next((k for k in ("layer", "name", "module") if k in value[0]), None)
        return [{**v, "layer": str(v.get(key))} for v in value] if key else None
    return None


def _chart(stage: str, technique: str, title: str, axis: str, names: list[str], **kw: Any) -> LayerChart:
    short, prefix = short_names(names)
    return LayerChart(stage, technique, title, axis, short, prefix=prefix, **kw)


def _unstructured(stage: str, info: dict) -> LayerChart | None:
    rows = _items(info.get("layers"))
    if not rows or not all(isinstance(r.get("sparsity"), (int, float)) for r in rows) or "heads_before" in rows[0]:
        return None
    values = [float(r["sparsity"]) for r in rows]
    nm = info.get("pattern")
    names = [r["layer"].removesuffix(".weight") for r in rows]
    accel = set(info.get("accelerated") or [])
    title = (f"{stage}: N:M {nm} zeros per layer" + (" (sparse kernels on marked layers)" if accel else "")
             if nm else f"{stage}: pruned weights (zeros) per layer")
    labels = [f"{v:.0%}" + (f" ({r['kept']:,} kept)" if isinstance(r.get("kept"), int) else "") for v, r in zip(values, rows)]
    return _chart(stage, "nm" if nm else "prune", title, "share of weights that are zero", names,
                  series={"zeros": values}, labels={"zeros": labels}, limits=(0, 1), percent=True,
                  marked=[r["layer"] in accel for r in rows], marked_means="semi-structured sparse kernel")


def _structured(stage: str, info: dict) -> LayerChart | None:
    rows = _items(info.get("layers"))
    if not rows or not all("out_before" in r and "out_after" in r for r in rows):
        return None
    kept = [r["out_after"] / r["out_before"] if r["out_before"] else 1.0 for r in rows]
    return _chart(stage, "structured", f"{stage}: output channels kept per layer (physically removed)",
                  "share of output channels kept", [r["layer"] for r in rows], series={"channels kept": kept},
                  labels={"channels kept": [f"{r['out_after']}/{r['out_before']}" for r in rows]}, limits=(0, 1),
                  percent=True)


def _transformer(stage: str, info: dict) -> LayerChart | None:
    rows = _items(info.get("layers"))
    if not rows or not all("heads_before" in r for r in rows):
        return None
    series, labels = {}, {}
    for what, before, after in (("heads kept", "heads_before", "heads_after"), ("FFN units kept", "ffn_before", "ffn_after")):
        if all(before in r and after in r for r in rows):
            series[what] = [r[after] / r[before] if r[before] else 1.0 for r in rows]
            labels[what] = [f"{r[after]}/{r[before]}" for r in rows]
    return _chart(stage, "transformer", f"{stage}: attention heads and FFN units kept per block",
                  "share kept", [r["layer"] for r in rows], series=series, labels=labels, limits=(0, 1), percent=True,
                  marked=[r.get("selected") is False for r in rows], marked_means="not selected by layers (kept whole)")


def _distill(stage: str, info: dict) -> LayerChart | None:
    rows = _items(info.get("layers"))
    if not rows or not all(isinstance(r.get(k), (int, float)) for r in rows
                           for k in ("feature_loss_start", "feature_loss_end")):
        return None
    start = [float(r["feature_loss_start"]) for r in rows]
    end = [float(r["feature_loss_end"]) for r in rows]
    teachers = [f" ← {r['teacher']}" if r.get("teacher") and r["teacher"] != r["layer"] else "" for r in rows]
    return _chart(stage, "distill", f"{stage}: feature loss per matched layer pair (student ← teacher), start and end",
                  "feature MSE to the teacher (as trained, unweighted)", [r["layer"] for r in rows],
                  series={"start of training": start, "end of training": end},
                  labels={"start of training": [f"{v:.3g}" for v in start],
                          "end of training": [f"{v:.3g}{t}" for v, t in zip(end, teachers)]},
                  marked=[e > s for s, e in zip(start, end)], marked_means="loss rose during training")


def _quantize(stage: str, info: dict) -> LayerChart | None:
    plan = _items(info.get("plan"))
    floats = info.get("float_layers") if isinstance(info.get("float_layers"), dict) else {}
    if not plan and not floats:
        return None
    rows = [(r["layer"], r.get("bits")) for r in plan or []] + [(str(n), None) for n in floats if n not in
                                                                  {r["layer"] for r in plan or []}]
    bits = [float(b) if isinstance(b, (int, float)) else 32.0 for _, b in rows]
    labels = [f"int{int(b)}" if isinstance(b, (int, float)) else "float" for _, b in rows]
    backend = info.get("backend")
    title = f"{stage}: weight bits per layer" + (f" ({backend})" if backend else "")
    return _chart(stage, "quantize", title, "bits per weight" + (" (float = 32)" if floats else ""), [n for n, _ in rows],
                  series={"bits": bits}, labels={"bits": labels}, limits=(0, 33 if 32.0 in bits else max(bits)),
                  marked=[b is None for _, b in rows], marked_means="left in float")


def _share(stage: str, info: dict) -> LayerChart | None:
    rows = _items(info.get("layers"))
    if not rows or not all("bits" in r and ("k" in r or "clusters" in r) for r in rows):
        return None
    bits = [float(r["bits"]) for r in rows]
    labels = [f"{r.get('k', r.get('clusters'))} clusters" for r in rows]
    return _chart(stage, "share", f"{stage}: shared-weight index bits per layer (k-means clusters)",
                  "bits per weight index", [r["layer"] for r in rows], series={"bits": bits}, labels={"bits": labels},
                  limits=(0, max(bits) + 1))


def _lowrank(stage: str, info: dict) -> LayerChart | None:
    rows = _items(info.get("layers"))
    if not rows or not all("rank" in r and "full_rank" in r for r in rows):
        return None
    applied = [r.get("applied", True) for r in rows]
    kept = [r["rank"] / r["full_rank"] if r["full_rank"] and a else 1.0 for r, a in zip(rows, applied)]
    labels = [f"rank {r['rank']}/{r['full_rank']}" if a else "kept whole" for r, a in zip(rows, applied)]
    return _chart(stage, "lowrank", f"{stage}: rank kept per factorized layer", "rank / full rank",
                  [r["layer"] for r in rows], series={"rank kept": kept}, labels={"rank kept": labels}, limits=(0, 1),
                  percent=True, marked=[not a for a in applied], marked_means="not factorized (too small to gain)")


def _layer_drop(stage: str, info: dict) -> LayerChart | None:
    scores, removed = info.get("importance"), info.get("removed")
    if not isinstance(scores, dict) or not scores or not isinstance(removed, list):
        return None
    names = list(scores)
    values = [float(scores[n]) for n in names]
    return _chart(stage, "layer_drop", f"{stage}: block importance (marked: removed)", "importance (higher = kept)",
                  names, series={"importance": values},
                  labels={"importance": ["removed" if n in removed else f"{v:.3g}" for n, v in zip(names, values)]},
                  marked=[n in removed for n in names], marked_means="removed")


def _generic(stage: str, info: dict) -> LayerChart | None:
    for key, value in info.items():
        rows = _items(value) if key not in ("sensitivity", "steps") else None
        val_key = next((k for k in GENERIC_KEYS if rows and isinstance(rows[0].get(k), (int, float))), None)
        if rows and val_key:
            values = [float(r.get(val_key) or 0) for r in rows]
            return _chart(stage, val_key, f"{stage}: {val_key} per layer", val_key, [r["layer"] for r in rows],
                          series={val_key: values}, labels={val_key: [f"{v:.3g}" for v in values]})
    return None


READERS: list[Callable[[str, dict], LayerChart | None]] = [
    _transformer, _structured, _lowrank, _share, _distill, _unstructured, _quantize, _layer_drop, _generic]


def layer_charts(run: dict[str, Any]) -> list[LayerChart]:
    """One chart per row whose stage info has per-layer data (rows in run order)."""
    charts = []
    for row in run.get("rows", []):
        info = row.get("info") if isinstance(row.get("info"), dict) else {}
        for read in READERS:
            chart = read(str(row.get("stage", "?")), info)
            if chart is not None and chart.layers:
                charts.append(_capped(chart))
                break
    return charts


def _capped(chart: LayerChart) -> LayerChart:
    n = len(chart.layers)
    if n <= MAX_BARS:
        return chart
    chart.title += f" (first {MAX_BARS} of {n} layers; all in run.json)"
    chart.layers = chart.layers[:MAX_BARS]
    chart.series = {k: v[:MAX_BARS] for k, v in chart.series.items()}
    chart.labels = {k: v[:MAX_BARS] for k, v in chart.labels.items()}
    chart.marked = chart.marked[:MAX_BARS]
    return chart


def schedule_series(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Gradual pruning schedules (info['schedule_log']: [{step, sparsity}]) per stage."""
    out = []
    for row in run.get("rows", []):
        log = (row.get("info") or {}).get("schedule_log")
        if isinstance(log, list) and log and all(isinstance(p, dict) and {"step", "sparsity"} <= set(p) for p in log):
            out.append({"stage": row.get("stage"), "x": [p["step"] for p in log], "y": [p["sparsity"] for p in log]})
    return out

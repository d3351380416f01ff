"""Report figures of the dynamic techniques: accuracy over an online stream with its drift
points (``torchslim online`` run.json), and for an early-exit or cascade stage the exit-rate
histogram and accuracy against mean cost as the threshold varies (its stage info). Drawn like
every other figure of the report (``charts.py``: static SVG + PNG)."""

from __future__ import annotations

from typing import Any

WINDOW = 20  # batches in the rolling mean of the online accuracy curve


def online_series(run: dict[str, Any]) -> dict[str, Any] | None:
    """{x: samples, y: rolling accuracy, drifts: [sample], evals: {name: (batches, accs)}} or None."""
    online = run.get("online") if isinstance(run.get("online"), dict) else None
    curve = [p for p in (online or {}).get("curve", []) if isinstance(p, dict) and "acc" in p and "samples" in p]
    if not curve:
        return None
    ys, acc = [], []
    for p in curve:
        acc.append(float(p["acc"]))
        window = acc[-WINDOW:]
        ys.append(sum(window) / len(window))
    drifts = [e.get("sample") for e in online.get("drift_events", []) if isinstance(e, dict) and e.get("direction") == "up"]
    by_batch = {p["batch"]: p["samples"] for p in curve if "batch" in p}
    evals: dict[str, tuple[list, list]] = {}
    for e in online.get("segment_eval", []):
        if not isinstance(e, dict) or "batch" not in e:
            continue
        for name, value in e.items():
            if name != "batch" and isinstance(value, (int, float)):
                xs, vs = evals.setdefault(name, ([], []))
                xs.append(by_batch.get(e["batch"] - 1, e["batch"]))
                vs.append(float(value))
    return {"x": [p["samples"] for p in curve], "y": ys, "drifts": [d for d in drifts if d is not None], "evals": evals}


def exit_series(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per early-exit / cascade stage: {stage, rates, labels, cost, accuracy}."""
    out = []
    for row in run.get("rows", []):
        info = row.get("info") or {}
        rates, curve = info.get("exit_rates"), info.get("curve")
        if not (isinstance(rates, list) and isinstance(curve, dict)):
            continue
        labels = [str(n) for n in info.get("exits_after", [])] + ["end"]
        out.append({"stage": row.get("stage"), "rates": [float(r) for r in rates],
                    "labels": labels if len(labels) == len(rates) else [str(i) for i in range(len(rates))],
                    "cost": list(curve.get("mean_cost", [])), "accuracy": list(curve.get("accuracy", []))})
    return out


def dynamic_figures(run: dict[str, Any], with_captions: bool = False) -> list[tuple]:
    """[(id, Figure)] (or [(id, caption, Figure)]): the online accuracy curve, and per early-exit
    or cascade stage the exit rates and the accuracy-cost curve (matplotlib, see ``charts.py``)."""
    from .charts import line_chart, simple_bars

    figs = []
    s = online_series(run)
    if s is not None:
        lines = [{"name": f"prequential accuracy ({WINDOW}-batch mean)", "x": s["x"], "y": s["y"]}]
        lines += [{"name": f"held-out: {name}", "x": xs, "y": vs, "markers": True} for name, (xs, vs) in s["evals"].items()]
        fig = line_chart("online: accuracy over the stream", "samples seen", "accuracy", lines, vlines=s["drifts"],
                         fraction=True, vline_label="drift detected", height=3.8)
        figs.append(("online-accuracy", "Accuracy over the stream (dashed: drift detected)", fig))
    for e in exit_series(run):
        fig = simple_bars(f"{e['stage']}: share of test samples leaving at each exit", e["labels"], e["rates"],
                          "share of samples (exit after)")
        figs.append((f"exits-{e['stage']}", f"{e['stage']}: exit rates", fig))
        if e["cost"] and len(e["cost"]) == len(e["accuracy"]):
            order = sorted(range(len(e["cost"])), key=lambda i: e["cost"][i])
            fig = line_chart(f"{e['stage']}: accuracy vs mean cost as the threshold varies",
                             "mean cost (share of the full model's MACs)", "accuracy",
                             [{"name": "threshold sweep", "x": [e["cost"][i] for i in order],
                               "y": [e["accuracy"][i] for i in order], "markers": True}], fraction=True)
            figs.append((f"exit-curve-{e['stage']}", f"{e['stage']}: accuracy against cost", fig))
    return figs if with_captions else [(fid, fig) for fid, _, fig in figs]

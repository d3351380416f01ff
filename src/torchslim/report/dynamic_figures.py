"""Report figures of the dynamic techniques: accuracy over an online stream with its drift
points (``torchslim online`` run.json), and for an early-exit or cascade stage the exit-rate
histogram and accuracy against mean cost as the threshold varies (its stage info)."""

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


def dynamic_figures(run: dict[str, Any]) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go

    figs = []
    s = online_series(run)
    if s is not None:
        fig = go.Figure(go.Scatter(x=s["x"], y=s["y"], mode="lines", name=f"prequential accuracy ({WINDOW}-batch mean)"))
        for name, (xs, vs) in s["evals"].items():
            fig.add_trace(go.Scatter(x=xs, y=vs, mode="lines+markers", name=f"held-out: {name}"))
        for d in s["drifts"]:
            fig.add_vline(x=d, line_dash="dash", line_color="#a40")
        fig.update_layout(title="online: accuracy over the stream (dashed: drift detected)", xaxis_title="samples seen",
                          yaxis_title="accuracy", yaxis_range=[0, 1], height=420)
        figs.append(("online-accuracy", fig))
    for e in exit_series(run):
        fig = go.Figure(go.Bar(x=e["labels"], y=e["rates"]))
        fig.update_layout(title=f"{e['stage']}: share of test samples leaving at each exit", xaxis_title="exit after",
                          yaxis_title="share of samples", yaxis_range=[0, 1], height=360)
        figs.append((f"exits-{e['stage']}", fig))
        if e["cost"] and len(e["cost"]) == len(e["accuracy"]):
            fig = go.Figure(go.Scatter(x=e["cost"], y=e["accuracy"], mode="lines+markers"))
            fig.update_layout(title=f"{e['stage']}: accuracy vs mean cost as the threshold varies",
                              xaxis_title="mean cost (share of the full model's MACs)", yaxis_title="accuracy", height=360)
            figs.append((f"exit-curve-{e['stage']}", fig))
    return figs

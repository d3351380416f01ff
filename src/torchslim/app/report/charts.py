"""Drawing the report's figures with matplotlib, to inline SVG (the HTML) and PNG (beside it).

Why static SVG: the report must open with no network and stay small. plotly inlined its 4.6 MB
library for a 3-row table; an SVG chart from matplotlib is 10–40 KB, needs no script at all,
and the PNG files are drawn from the very same Figure objects, so both show the same numbers.
Text stays text in the SVG (``svg.fonttype: none``: searchable, small), ids are salted
deterministically so identical runs write identical reports. Figures are built with
``matplotlib.figure.Figure`` directly, never pyplot, so no global backend state changes.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from typing import Any

from .fmt import padded_range
from .layers import LayerChart

BLUE, ORANGE, GREY = "#1b6ca8", "#d95f02", "#888888"
RC = {"svg.fonttype": "none", "svg.hashsalt": "torchslim-report", "font.size": 9, "axes.titlesize": 10,
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "font.family": "DejaVu Sans"}
WIDTH = 8.0  # inches; 96 px each in the page


@contextlib.contextmanager
def style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(RC):
        yield


def styled(build: Any) -> Any:
    """Run a figure builder inside ``style()`` (fonts, grid, spines are read as artists are made)."""
    import functools

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with style():
            return build(*args, **kwargs)

    return wrapper


def new_figure(height: float, ncols: int = 1, width: float = WIDTH) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    with style():  # rcParams are read when the artists are made
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, ncols) if ncols > 1 else fig.add_subplot()
    return fig, axes


def to_svg(fig: Any) -> str:
    """The figure as an inline <svg> element (no XML prolog, no doctype, no date)."""
    buf = io.StringIO()
    with style():
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    start, end = text.find("<metadata>"), text.find("</metadata>")
    if 0 <= start < end:  # the RDF block names the creator only; 1 KB per figure
        text = text[:start] + text[end + len("</metadata>"):]
    return text


def to_png(fig: Any, path: Any) -> None:
    with style():
        fig.savefig(path, format="png", dpi=110, metadata={"Software": None})


def _percent_axis(axis: Any, span: float | None = None) -> None:
    """Ticks as "97.5 %": as many decimals as the axis span needs, no more."""
    from matplotlib.ticker import FuncFormatter

    nd = 0 if span is None or span >= 0.1 else 1 if span >= 0.01 else 2
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:.{nd}f} %"))


def _plain_log_axis(axis: Any, values: list[float]) -> None:
    """Log ticks as plain numbers (1, 2, 5 per decade over a short range, decades over a long
    one), no minor labels: "2×10^2 3×10^2" labels ran into each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pos = [v for v in values if v and v > 0]
    decades = math.log10(max(pos) / min(pos)) if pos else 0
    axis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades > 2.5 else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


@styled
def pareto_chart(pts: list[dict[str, Any]], fronts: dict[str, list[dict]], metric_name: str, fraction: bool) -> Any:
    """Metric against size and against latency, one panel each; points numbered, the numbers
    explained in one legend (stage names never overlap however close the points are)."""
    fig, axes = new_figure(3.9, ncols=2)
    markers = "osD^vP*Xhp<>"
    handles = []
    for ax, (x, label) in zip(axes, (("kb", "size on disk (KB, log scale)"), ("ms", "latency (ms per batch)"))):
        valid = [(i, p) for i, p in enumerate(pts) if p.get(x) is not None and p.get("metric") is not None]
        for i, p in valid:
            h = ax.scatter([p[x]], [p["metric"]], s=36, marker=markers[i % len(markers)], color=f"C{i % 10}", zorder=3,
                           label=f"{i + 1} {p['name']}")
            if ax is axes[0]:
                handles.append(h)
        for text, (px, py) in _grouped_labels(valid, x):
            ax.annotate(text, (px, py), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = fronts.get(x, [])
        if len(front) > 1:
            ax.plot([p[x] for p in front], [p["metric"] for p in front], ":", color=GREY, zorder=2)
        if x == "kb":
            ax.set_xscale("log")
            _plain_log_axis(ax.xaxis, [p[x] for _, p in valid])
        xr = padded_range([p[x] for _, p in valid], pad=0.12) if x == "ms" else None
        if xr:
            ax.set_xlim(*xr)
        ax.set_xlabel(label)
        ax.set_title(f"{metric_name} vs {label.split(' (')[0]}")
    yr = padded_range([p["metric"] for p in pts if p.get("metric") is not None], fraction=fraction, pad=0.15)
    for ax in axes:
        if yr:
            ax.set_ylim(*yr)
        if fraction:
            _percent_axis(ax.yaxis, yr[1] - yr[0] if yr else None)
    axes[0].set_ylabel(metric_name)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4) or 1, fontsize=8, frameon=False,
               title="stages (dotted: Pareto front)", title_fontsize=8)
    return fig


def _grouped_labels(valid: list[tuple[int, dict]], x: str, near: float = 0.05) -> list[tuple[str, tuple[float, float]]]:
    """Point numbers; points closer than ``near`` of the axis spans share one label ("4,5"), so
    numbers never print over one another."""
    def tx(p: dict) -> float:
        return math.log10(p[x]) if x == "kb" and p[x] > 0 else p[x]

    xs, ys = [tx(p) for _, p in valid], [p["metric"] for _, p in valid]
    xspan, yspan = (max(xs) - min(xs)) or 1.0 if xs else 1.0, (max(ys) - min(ys)) or 1.0 if ys else 1.0
    groups: list[tuple[list[int], float, float, tuple[float, float]]] = []
    for i, p in valid:
        for nums, gx, gy, _ in groups:
            if abs(tx(p) - gx) <= near * xspan and abs(p["metric"] - gy) <= near * yspan:
                nums.append(i + 1)
                break
        else:
            groups.append(([i + 1], tx(p), p["metric"], (p[x], p["metric"])))
    return [(",".join(map(str, nums)), at) for nums, _, _, at in groups]


@styled
def bar_chart(chart: LayerChart) -> Any:
    """Horizontal bars, one row per layer (names stay readable at any count), a text at the end
    of each bar, marked bars in orange."""
    n, k = len(chart.layers), len(chart.series)
    fig, ax = new_figure(0.9 + 0.22 * n * max(k, 1) + 0.3 * (k > 1 or bool(chart.marked_means and any(chart.marked))))
    height = 0.8 / max(k, 1)
    for j, (name, values) in enumerate(chart.series.items()):
        ys = [i + (j - (k - 1) / 2) * height for i in range(n)]
        colors = [ORANGE if (chart.marked and chart.marked[i]) else (BLUE if j == 0 else "#66a61e") for i in range(n)]
        bars = ax.barh(ys, values, height=height * 0.92, color=colors, label=name)
        if name in chart.labels:
            ax.bar_label(bars, labels=chart.labels[name], padding=3, fontsize=7)
    ax.set_yticks(range(n), chart.layers, fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="y", visible=False)
    lo, hi = chart.limits if chart.limits else (min(0.0, *(min(v) for v in chart.series.values())),
                                                max(max(v) for v in chart.series.values()) or 1.0)
    ax.set_xlim(lo, hi + (hi - lo) * 0.22)  # room for the text after the longest bar
    if chart.percent:
        _percent_axis(ax.xaxis)
        ax.set_xticks([t / 4 for t in range(5)])
    ax.set_xlabel(chart.axis + (f"  (layer names without '{chart.prefix}')" if chart.prefix else ""))
    ax.set_title(chart.title, loc="left")
    handles = []
    if k > 1:
        handles += ax.get_legend_handles_labels()[0]
    if chart.marked_means and any(chart.marked):
        from matplotlib.patches import Patch

        handles.append(Patch(color=ORANGE, label=chart.marked_means))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


def simple_bars(title: str, names: Sequence[str], values: Sequence[float], axis: str, percent: bool = True) -> Any:
    """Horizontal bars for a few named values (exit rates)."""
    chart = LayerChart("", "", title, axis, list(names), {"": list(values)},
                       labels={"": [f"{v:.0%}" if percent else f"{v:.3g}" for v in values]},
                       limits=(0, 1) if percent else None, percent=percent)
    return bar_chart(chart)


@styled
def line_chart(title: str, xlabel: str, ylabel: str, lines: list[dict[str, Any]], *, vlines: Sequence[float] = (),
               fraction: bool = False, vline_label: str = "", height: float = 3.4) -> Any:
    """Lines ({name, x, y, markers}); dashed vertical lines at vlines; padded y range."""
    fig, ax = new_figure(height)
    for i, line in enumerate(lines):
        ax.plot(line["x"], line["y"], marker="o" if line.get("markers") else None, markersize=3, color=f"C{i % 10}",
                label=line["name"])
    for j, v in enumerate(vlines):
        ax.axvline(v, linestyle="--", color=ORANGE, linewidth=1, label=vline_label if j == 0 and vline_label else None)
    yr = padded_range([y for line in lines for y in line["y"]], fraction=fraction)
    if yr:
        ax.set_ylim(*yr)
    if fraction:
        _percent_axis(ax.yaxis, yr[1] - yr[0] if yr else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    if len(lines) > 1 or (vlines and vline_label):
        fig.legend(loc="outside lower center", ncols=min(len(lines) + bool(vlines), 4), fontsize=8, frameon=False)
    return fig

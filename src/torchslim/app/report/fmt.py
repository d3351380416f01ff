"""How the report writes numbers: deltas a reader can take in at a glance ("−0.4 pt", "1.8×",
"−62 % bytes"), sizes with units, short layer names, and padded axis ranges."""

from __future__ import annotations

import math
import os

MINUS = "\u2212"  # a real minus sign: "-0.4" reads as a hyphen in a table


def _signed(value: float, nd: int) -> str:
    text = f"{abs(value):.{nd}f}"
    if float(text) == 0:
        return f"±{text}"
    return f"{MINUS if value < 0 else '+'}{text}"


def is_fraction_metric(name: str | None, values: list[float]) -> bool:
    """Accuracy-like (a share in [0, 1]): its deltas read best in points."""
    vals = [v for v in values if v is not None]
    return bool(vals) and all(0.0 <= v <= 1.0 for v in vals) and not any(
        k in (name or "").lower() for k in ("loss", "error_ms", "perplexity", "mse"))


def metric_delta(delta: float | None, in_points: bool) -> str | None:
    """"−0.4 pt" (accuracy-like metrics, ×100) or "−0.0123" (other metrics)."""
    if delta is None or not math.isfinite(delta):
        return None
    return f"{_signed(delta * 100, 1)} pt" if in_points else _signed(delta, 4)


def percent_change(new: float | None, old: float | None, what: str = "") -> str | None:
    """"−62 % bytes": the relative change of new against old."""
    if new is None or not old:
        return None
    text = f"{_signed((new - old) / old * 100, 0)} %"
    return f"{text} {what}".rstrip()


def ratio(value: float | None) -> str | None:
    """"1.8×" (two significant decimals below 10, one above)."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def count(n: float | None) -> str | None:
    """12,345 below a million, else 12.3M / 1.20G."""
    if n is None:
        return None
    for unit, scale in (("G", 1e9), ("M", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{round(n):,}"


def size(n_bytes: float | None) -> str | None:
    """Bytes as B / KB / MB (1 KB = 1024 B)."""
    if n_bytes is None:
        return None
    for unit, scale in (("MB", 1024**2), ("KB", 1024)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} B"


def _elide(name: str, width: int) -> str:
    """Drop whole dotted components, from the middle outwards and never the first, the last or a
    block number, until the name fits ("bert.encoder.layer.10.….dense"); then cut characters."""
    parts = name.split(".")
    kept = [True] * len(parts)

    def text() -> str:
        out: list[str] = []
        for part, keep in zip(parts, kept):
            if keep:
                out.append(part)
            elif not out or out[-1] != "…":
                out.append("…")
        return ".".join(out)

    mid = (len(parts) - 1) / 2
    order = sorted((i for i in range(1, len(parts) - 1) if not parts[i].isdigit()), key=lambda i: abs(i - mid))
    for i in order:
        if len(text()) <= width:
            break
        kept[i] = False
    short = text()
    if len(short) > width:
        keep = (width - 1) // 2
        short = name[:keep] + "…" + name[-(width - 1 - keep):]
    return short


def short_names(names: list[str], width: int = 44) -> tuple[list[str], str]:
    """(names without their common dotted prefix, elided in the middle past ``width``; the prefix
    removed, "" if none), so per-layer charts have labels that fit beside their bars."""
    prefix = ""
    if len(names) > 1 and max(map(len, names)) > width * 2 // 3:  # short names stay whole ("net.1")
        common = os.path.commonprefix(names)
        prefix = common[: common.rfind(".") + 1] if "." in common else ""
        if any(n == prefix.rstrip(".") or not n[len(prefix):] for n in names):
            prefix = ""
    out = [_elide(n[len(prefix):] or n, width) for n in names]
    if len(set(out)) < len(out):  # elision made two names alike: keep them whole
        out = [n[len(prefix):] or n for n in names]
    return out, prefix


def padded_range(values: list[float], fraction: bool = False, pad: float = 0.08) -> tuple[float, float] | None:
    """An axis range around values with room on both sides; a flat series (every stage scores 1)
    gets a narrow window around its value, not 0–2. Fractions stay within [0, 1] plus a sliver."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    span = hi - lo
    margin = span * pad if span > 0 else max(abs(hi) * 0.01, 0.005 if fraction else 1e-3)
    lo, hi = lo - margin, hi + margin
    if fraction:
        lo, hi = max(lo, 0.0), min(hi, 1.0 + margin / 2)
    return lo, hi

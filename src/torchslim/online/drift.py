"""Drift detection on the prequential error stream (one 0/1 error per sample).

The detectors are River's (``river.drift.ADWIN``, ``river.drift.PageHinkley``): well-kept,
Cython-fast, and the reference the issue names. Their state is a Python object we will not
pickle (nothing untrusted is unpickled here), so a checkpoint stores the error bits the
detector has seen and ``load_state`` rebuilds it by replaying them: the detector is a pure
function of its input sequence, so the rebuilt one is identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import ConfigError


@dataclass
class DriftEvent:
    batch: int  # stream offset (0-based batch index) at which the detector fired
    sample: int  # samples seen before the firing sample
    direction: str  # "up" (error rose: adapt) or "down" (error fell)
    error_before: float
    error_after: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_detector(kind: str, delta: float) -> Any:
    try:
        from river import drift
    except ImportError as exc:  # pragma: no cover - river is a dependency of torchslim[online]
        raise ConfigError(f"OnlineConfig.detector: {kind!r} needs River (pip install river): {exc}") from None
    if kind == "adwin":
        return drift.ADWIN(delta=delta)
    if kind == "page_hinkley":
        return drift.PageHinkley(threshold=delta, mode="up")
    raise ConfigError(f"OnlineConfig.detector: unknown drift detector {kind!r}; use adwin or page_hinkley")


class DriftMonitor:
    """Feeds per-sample errors to a detector; returns the events of each batch."""

    def __init__(self, kind: str | None, delta: float):
        self.kind, self.delta = kind, delta
        self.detector = make_detector(kind, delta) if kind else None
        self.bits: list[torch.Tensor] = []
        self.seen = 0

    def _estimate(self) -> float:
        d = self.detector
        if hasattr(d, "estimation"):  # ADWIN: mean of its current window
            return float(d.estimation)
        mean = getattr(d, "_x_mean", None)  # Page-Hinkley: its running mean (a river.stats.Mean)
        return float(mean.get()) if hasattr(mean, "get") else 0.0

    def update(self, errors: torch.Tensor, batch: int, record: bool = True) -> list[DriftEvent]:
        errors = errors.to(torch.uint8).flatten().cpu()
        if record:
            self.bits.append(errors)
        events = []
        if self.detector is None:
            self.seen += len(errors)
            return events
        for e in errors.tolist():
            before = self._estimate()
            self.detector.update(e)
            self.seen += 1
            if self.detector.drift_detected:
                after = self._estimate()
                if self.kind == "page_hinkley":  # PH (mode "up") only fires on a rise; it resets its mean
                    after = before + 1e-9
                events.append(DriftEvent(batch, self.seen - 1, "up" if after > before else "down", before, after))
        return events

    def state(self) -> torch.Tensor:
        return torch.cat(self.bits) if self.bits else torch.zeros(0, dtype=torch.uint8)

    def load_state(self, bits: torch.Tensor) -> None:
        """Rebuild the detector by replaying the error bits it had seen (events are not re-emitted)."""
        self.__init__(self.kind, self.delta)
        self.update(bits, batch=-1, record=True)


def false_alarm_rate(kind: str, delta: float, p: float, n: int, runs: int, seed: int = 0) -> float:
    """Share of ``runs`` stationary Bernoulli(p) error streams of length n on which the detector fires."""
    gen = torch.Generator().manual_seed(seed)
    fired = 0
    for _ in range(runs):
        mon = DriftMonitor(kind, delta)
        errors = (torch.rand(n, generator=gen) < p).to(torch.uint8)
        fired += bool(mon.update(errors, 0, record=False))
    return fired / runs

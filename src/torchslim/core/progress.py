"""Progress of long work (training, calibration, pruning schedules): one API, built on rich.

    with progress.stage("stage 3/4 quantize"):            # the runner names the stage
        for batch in progress.track(batches, "calibration", total=len(batches)):
            ...
    with progress.bar("training", total=steps) as bar:    # fit: epoch, loss and metric
        bar.advance(1, epoch="3/30", loss=0.41)
    progress.note("sparsity 62% (update 7/20)")          # a field on the innermost open bar

**On or off.** ``setting`` True / False decides; ``None`` (the default everywhere) is *auto*:
on when the console is a terminal, off when output goes to a file or a pipe, under pytest, in a
multiprocessing worker (parallel search workers share their parent's terminal; even with
``TORCHSLIM_PROGRESS=1``, which they inherit), or with ``TORCHSLIM_PROGRESS=0`` (``=1`` turns it
on even without a terminal). Under torchrun only rank 0 draws bars, whatever the setting.

Bars that run inside one another (calibration inside a quantize stage inside a recipe) share
one rich ``Progress`` display, since rich allows one live display at a time; a bar disappears
when its work ends and the display stops with the last one, so nothing keeps refreshing while
the runner measures latency.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "TORCHSLIM_PROGRESS"
_stage: ContextVar[str | None] = ContextVar("torchslim_progress_stage", default=None)
_lock = threading.RLock()
_console: Any = None  # the console bars draw on (None: rich's default, stdout)
_display: Any = None  # the shared rich Progress while any bar is open
_open: list[Bar] = []
_records: list[list[str]] = []  # open recording() blocks


def _record(text: str) -> None:
    for log in _records:
        log.append(text)


@contextlib.contextmanager
def recording() -> Iterator[list[str]]:
    """Collect every text a bar shows inside the block (each change once), drawn or not
    elsewhere: ``with recording() as seen: fit(...)``; for logs and tests."""
    log: list[str] = []
    _records.append(log)
    try:
        yield log
    finally:
        _records.remove(log)


def _get_console() -> Any:
    if _console is not None:
        return _console
    from rich.console import Console

    return Console()


@contextlib.contextmanager
def use_console(console: Any) -> Iterator[Any]:
    """Draw bars on ``console`` (a ``rich.console.Console``) inside the block; tests pass
    ``Console(force_terminal=True, file=...)`` to see what a terminal would show."""
    global _console
    before, _console = _console, console
    try:
        yield console
    finally:
        _console = before


def enabled(setting: bool | None = None, console: Any = None) -> bool:
    """Whether bars are drawn: rank 0 only; then ``setting`` if given, else auto (see above)."""
    from . import distributed

    if not distributed.is_main():
        return False
    if setting is not None:
        return bool(setting)
    import multiprocessing

    # a worker (parallel search) shares its parent's terminal, which draws the bars: none here,
    # even under TORCHSLIM_PROGRESS=1 (the workers inherit the parent's environment)
    if multiprocessing.parent_process() is not None:
        return False
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    if "PYTEST_CURRENT_TEST" in os.environ and _console is None and console is None:
        return False
    return bool((console or _get_console()).is_terminal)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """Every bar opened inside the block is prefixed with ``label`` ("stage 3/4 quantize"); a bar
    the block left open (its work raised) is closed when the block ends."""
    token = _stage.set(label)
    with _lock:
        depth = len(_open)
    try:
        yield
    finally:
        _stage.reset(token)
        with _lock:
            left = _open[depth:]
        for b in reversed(left):
            b.close()


def current_stage() -> str | None:
    return _stage.get()


def describe(label: str) -> str:
    """The bar's description: the current stage, then what runs ("stage 2/3 prune · training")."""
    where = _stage.get()
    return f"{where} · {label}" if where else label


def _fields_text(fields: dict[str, Any]) -> str:
    parts = []
    ordered = sorted(fields.items(), key=lambda kv: kv[0] == "note")  # a note comes last
    for key, value in ordered:
        if value is None or value == "":
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(str(value) if key == "note" else f"{key} {value}")
    return " · ".join(parts)


class Bar:
    """One bar of the shared display; ``advance(n, **fields)`` / ``show(**fields)`` update the
    counter and the text after it (``epoch="3/30", loss=0.41``); ``close()`` removes it."""

    def __init__(self, label: str, total: int | None, completed: int = 0, console: Any = None):
        global _display
        self.label, self.fields = describe(label), {}
        with _lock:
            start = _display is None
            if start:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                _display = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                    console=console or _get_console(), transient=True, refresh_per_second=4)
            self.display = _display
            self.task = _display.add_task(self.label, total=total, completed=completed, info="")
            _open.append(self)
            if start:  # after the first task is added, so even a short bar is drawn once
                _display.start()
        _record(self.text())

    def show(self, **fields: Any) -> None:
        before = dict(self.fields)
        self.fields.update(fields)
        if self.fields != before:
            self.display.update(self.task, info=_fields_text(self.fields))
            _record(self.text())

    def advance(self, n: int = 1, **fields: Any) -> None:
        if fields:
            self.show(**fields)
        self.display.advance(self.task, n)

    def text(self) -> str:
        """What the bar says now (its description and fields), for logs and tests."""
        return f"{self.label} {_fields_text(self.fields)}".strip()

    def close(self) -> None:
        global _display
        with _lock:
            if self not in _open:
                return
            _open.remove(self)
            if _open:
                self.display.remove_task(self.task)
            elif _display is not None:  # the last bar: drawn once more as it ended, then cleared
                _display.stop()
                _display = None

    def __enter__(self) -> Bar:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Off:
    """The bar when progress is off: every call does nothing."""

    def show(self, **fields: Any) -> None: ...

    def advance(self, n: int = 1, **fields: Any) -> None: ...

    def text(self) -> str:
        return ""

    def close(self) -> None: ...

    def __enter__(self) -> _Off:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None: ...


def bar(label: str, total: int | None = None, *, setting: bool | None = None, completed: int = 0) -> Bar | _Off:
    """A bar for ``total`` steps (None: unknown), or a do-nothing one when progress is off."""
    return Bar(label, total, completed) if enabled(setting) else _Off()


def track(iterable: Iterable[T], label: str, total: int | None = None, *, setting: bool | None = None) -> Iterator[T]:
    """Yield the items of iterable, advancing a bar labelled ``label`` after each."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with bar(label, total, setting=setting) as b:
        for item in iterable:
            yield item
            b.advance(1)


def note(text: str) -> None:
    """Show ``text`` on the innermost open bar (e.g. the pruning schedule's current sparsity on
    the training bar it runs in); nothing when no bar is open."""
    with _lock:
        target = _open[-1] if _open else None
    if target is not None:
        target.show(note=text)


def open_bars() -> list[str]:
    """The text of every open bar, outermost first."""
    with _lock:
        return [b.text() for b in _open]

"""Streams: any iterable of ``(inputs, targets)`` batches, plus adapters.

A stream used with checkpoints must be *re-creatable*: iterating it again yields the same
batches in the same order, so that resume can skip the ``offset`` batches already learned from
(``skip(n)`` when a stream can jump, else the first n batches are read and dropped). The
adapters here all are: a Task split (shuffled with a fixed seed), arrays, a folder of ``.npz``
files read in name order, a generator *factory*. A bare generator object is accepted but is
one-shot (resume then cannot re-read what it already gave).
"""

from __future__ import annotations

import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ConfigError, TaskError
from ..core.task import Task

Batch = tuple[Any, torch.Tensor]


def as_batch(item: Any) -> Batch:
    """(x, y) with tensors (numpy arrays are converted: float features, integer labels)."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TaskError(f"a stream must yield (inputs, targets) pairs, got {type(item).__name__}")
    x, y = item
    if isinstance(x, np.ndarray):
        x = torch.as_tensor(x, dtype=torch.float32)
    if isinstance(y, np.ndarray):
        y = torch.as_tensor(y)
    if not isinstance(y, torch.Tensor):
        raise TaskError(f"a stream batch's targets must be a Tensor or array, got {type(y).__name__}")
    return x, y


def batches_from(stream: Iterable[Any], offset: int = 0) -> Iterator[Batch]:
    """The stream's batches from ``offset`` on (0-based count of batches)."""
    if offset and hasattr(stream, "skip"):
        return (as_batch(b) for b in stream.skip(offset))
    return (as_batch(b) for b in islice(iter(stream), offset, None))


def stream_length(stream: Iterable[Any]) -> int | None:
    """How many batches ``stream`` yields, when that is known without reading it (a list, an
    ArrayStream, a Task split, a Concat of such); None for a folder, a generator, or anything
    else whose length only its end tells."""
    if isinstance(stream, (Concat, TaskStream)):
        return stream.length()
    if isinstance(stream, (Iterator, FolderStream, GeneratorStream)):
        return None
    try:
        return len(stream)  # type: ignore[arg-type]
    except TypeError:
        return None


class ArrayStream:
    """Arrays cut into consecutive batches (in the given order)."""

    def __init__(self, x: Any, y: Any, batch_size: int = 32):
        if not (isinstance(batch_size, int) and 1 <= batch_size <= 65_536):
            raise ConfigError(f"ArrayStream.batch_size: must be an integer in [1, 65536], got {batch_size!r}")
        self.x = torch.as_tensor(np.asarray(x), dtype=torch.float32) if not isinstance(x, torch.Tensor) else x
        self.y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
        if len(self.x) != len(self.y):
            raise TaskError(f"ArrayStream: {len(self.x)} inputs but {len(self.y)} targets")
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def skip(self, n: int) -> Iterator[Batch]:
        for i in range(n * self.batch_size, len(self.x), self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        return self.skip(0)


class TaskStream:
    """A Task split as a stream: ``epochs`` passes, the loader's shuffling reseeded with ``seed``."""

    def __init__(self, task: Task, split: str = "train", epochs: int = 1, seed: int = 0):
        self.loader = task.split(split)
        self.epochs, self.seed = epochs, seed

    def length(self) -> int | None:
        n = stream_length(self.loader)
        return None if n is None else n * self.epochs

    def __iter__(self) -> Iterator[Batch]:
        sampler = getattr(self.loader, "sampler", None)
        gen = getattr(sampler, "generator", None) or getattr(self.loader, "generator", None)
        if gen is not None:
            gen.manual_seed(self.seed)
        for _ in range(self.epochs):
            yield from self.loader


class GeneratorStream:
    """Batches from ``factory()`` (called afresh on every iteration, so it is re-creatable), or
    from one generator object (one-shot)."""

    def __init__(self, source: Callable[[], Iterable[Any]] | Iterator[Any]):
        self.source = source
        self.resumable = callable(source) and not isinstance(source, Iterator)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.source() if self.resumable else self.source)


class FolderStream:
    """``.npz`` files arriving in a folder, read in name order (name them so that later files sort
    later, e.g. a zero-padded sequence number or a UTC timestamp; write each one under a name
    starting with "." or ending in ".tmp" and rename it, so a half-written file is never read).
    Each file is one batch (or split into ``batch_size`` chunks). Arrays are read with
    ``allow_pickle=False``. The stream ends when a file named ``end_marker`` appears, or after
    ``idle_timeout`` seconds without a new file (None: wait for the marker)."""

    def __init__(self, folder: str | Path, pattern: str = "*.npz", x_key: str = "x", y_key: str = "y",
                 batch_size: int | None = None, poll: float = 0.2, idle_timeout: float | None = 5.0,
                 end_marker: str = "END"):
        self.folder, self.pattern, self.x_key, self.y_key = Path(folder), pattern, x_key, y_key
        self.batch_size, self.poll, self.idle_timeout, self.end_marker = batch_size, poll, idle_timeout, end_marker
        if not self.folder.is_dir():
            raise TaskError(f"FolderStream: {str(self.folder)!r} is not a folder")

    def _ready(self, seen: set[str]) -> list[Path]:
        files = [p for p in self.folder.glob(self.pattern)
                 if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp") and p.name not in seen]
        return sorted(files, key=lambda p: p.name)

    def read(self, path: Path) -> list[Batch]:
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f[self.x_key], f[self.y_key]
        except KeyError as exc:
            raise TaskError(f"FolderStream {str(path)!r}: no array {exc}") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise TaskError(f"FolderStream {str(path)!r}: not a readable .npz of numeric arrays "
                            f"({type(exc).__name__})") from None
        if len(x) != len(y):
            raise TaskError(f"FolderStream {str(path)!r}: {len(x)} inputs but {len(y)} targets")
        if self.batch_size is None:
            return [as_batch((x, y))]
        b = self.batch_size
        return [as_batch((x[i:i + b], y[i:i + b])) for i in range(0, len(x), b)]

    def __iter__(self) -> Iterator[Batch]:
        seen: set[str] = set()
        last_name, idle_since = "", time.monotonic()
        while True:
            ready = self._ready(seen)
            if not ready:
                if (self.folder / self.end_marker).exists():
                    return
                if self.idle_timeout is not None and time.monotonic() - idle_since > self.idle_timeout:
                    return
                time.sleep(self.poll)
                continue
            for path in ready:
                if path.name < last_name:
                    warnings.warn(f"FolderStream: {path.name} arrived after {last_name} but sorts before it; "
                                  "a resumed run would read the files in another order", stacklevel=2)
                seen.add(path.name)
                last_name = max(last_name, path.name)
                yield from self.read(path)
            idle_since = time.monotonic()


class Concat:
    """Streams one after the other (e.g. segments before and after a drift)."""

    def __init__(self, *streams: Iterable[Any]):
        self.streams = streams

    def length(self) -> int | None:
        parts = [stream_length(s) for s in self.streams]
        return None if None in parts else sum(parts)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for s in self.streams:
            yield from s

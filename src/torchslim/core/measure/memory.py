"""Peak memory of one call: CUDA allocator statistics, or torch's CPU allocation events.

The CPU figure is the peak of the running sum of allocations and frees made *by the calling
thread* while fn runs (events from other threads of the process, e.g. a data loader or a test's
helper thread, are left out: they are not this forward's memory). Sampled RSS growth is the
fallback when the profiler is unavailable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import check

log = logging.getLogger(__name__)


def _rss_bytes() -> int | None:
    """Current resident set size from /proc (Linux); None where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, str]:
    """(bytes, kind): memory allocated at the peak of one call of fn, above what was allocated
    before it (tensors alive before the call are not counted).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the same quantity from the profiler's
    allocation events, because RSS barely moves once the allocator holds memory from earlier
    calls; sampled RSS growth only if the profiler fails.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return int(peak), "cuda max_memory_allocated delta"
    try:
        return _profiled_cpu_peak(fn), "torch CPU allocation peak (profiler)"
    except Exception as exc:  # noqa: BLE001 - profiler internals vary across versions
        log.info("peak_memory: profiler failed (%s); sampling RSS instead", exc)
        return _sampled_rss_peak(fn), "sampled RSS delta"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 while the profiler runs: Kineto's C++ logger prints
    'profiler_start/stop' lines there that would litter every CLI table."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _profiled_cpu_peak(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of CPU allocations and frees recorded by torch.profiler, over
    the events of the calling thread only (a marker allocation made first names its id)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    marker = 7919  # an odd byte count nothing else allocates right here
    with (
        _quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        torch.inference_mode(),
    ):
        torch.empty(marker, dtype=torch.uint8)
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.start_tid, e.typed[1].alloc_size))
    events.sort()
    mine = next((tid for _, tid, size in events if size == marker), None)
    check(mine is not None, "peak_memory", "the profiler recorded no allocation of the marker")
    current = peak = 0
    skip = {marker, -marker}  # the marker's allocation and its free are not fn's
    for _, tid, size in events:
        if tid != mine:
            continue
        if size in skip:
            skip.discard(size)
            continue
        current += size
        peak = max(peak, current)
    return int(peak)


def _sampled_rss_peak(fn: Callable[[], Any], interval_s: float = 2e-4) -> int:
    """RSS growth during fn, sampled from a thread (torch kernels release the GIL)."""
    before = _rss_bytes()
    check(before is not None, "peak_memory", "neither the profiler nor /proc is available")
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        with torch.inference_mode():
            fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], _rss_bytes() or 0) - before)

"""Latency a user can trust (issue 9): shipped form, interleaved baseline, contention warnings,
runtime names, ISA facts on every record."""

import copy
import hashlib
import os
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.core.isa import cpu_isa, int8_saturates, machine_facts
from torchslim.core.measure import MeasureConfig, Record, format_records, measure
from torchslim.core.measure.memory import peak_memory
from torchslim.core.measure.timing import runtime_label, shipped_form, timing_warnings
from torchslim.core.task import Task


class _Slow(nn.Module):
    """A parametrization that costs real time on every forward (like a codebook expansion)."""

    def forward(self, w):
        for _ in range(20):
            w = w * 1.0
        return w


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def _task():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return Task(name="toy", test=torch.utils.data.DataLoader(ds, batch_size=64))


def test_isa_facts_are_consistent_with_torch():
    f = cpu_isa()
    assert f["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    if f["torch_capability"] == "AVX512":
        assert f["avx512"]
    if f["torch_capability"] in ("AVX2", "AVX512"):
        assert f["avx2"] and f["summary"].startswith(("AVX2", "AVX-512"))
        assert int8_saturates() == (not f["vnni"] and not f["amx"])
    m = machine_facts(3)
    assert m["threads"] == 3 and m["isa"] == f["summary"] and m["cpu"]


def test_shipped_form_materializes_a_copy_and_leaves_the_model_alone():
    model = _mlp()
    parametrize.register_parametrization(model[0], "weight", _Slow())
    x = torch.randn(8, 64)
    ref = model(x)
    shipped, note = shipped_form(model)
    assert "materialized" in note and "0.weight" in note
    assert not parametrize.is_parametrized(shipped[0]) and type(shipped[0]) is nn.Linear
    assert torch.equal(shipped(x), ref)
    # the original still has its parametrization and still works (removing it on a deepcopy
    # would delete the property from the generated class the two share)
    assert parametrize.is_parametrized(model[0]) and torch.equal(model(x), ref)
    plain = _mlp()
    assert shipped_form(plain) == (plain, None)


def test_measure_times_the_shipped_form_against_the_reference():
    task = _task()
    base = _mlp()
    model = copy.deepcopy(base)
    parametrize.register_parametrization(model[0], "weight", _Slow())
    rec = measure(model, task, MeasureConfig(batch_size=64, threads=1, repeats=15, memory=False),
                  reference=base)
    assert any("shipped form" in n for n in rec.notes)
    assert set(rec.speedup) == {"eager"} and rec.reference_latency["median_ms"] > 0
    assert rec.runtime_labels == {"eager": "PyTorch eager"}
    assert rec.machine["isa"] == cpu_isa()["summary"] and rec.machine["threads"] == 1
    # same dense kernels once materialized: a ratio near 1 (generous: shared CI machines)
    assert 0.5 <= rec.speedup["eager"] <= 2.0, rec.speedup
    d = Record.from_dict(rec.to_dict())
    assert d.speedup == rec.speedup and d.machine == rec.machine


def test_timing_warnings_name_spread_starvation_and_busy_threads():
    quiet = {"load": {"cpu_share": 0.99, "extra_cores": 0.0, "other_cores": None, "threads": 1, "cores": 2}}
    ok = {"a": {"median_ms": 1.0, "p10_ms": 0.95, "p90_ms": 1.1, **quiet}}
    assert timing_warnings(ok) == []
    wide = {"a": {"median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.6, **quiet}}
    assert "wide spread" in timing_warnings(wide)[0]
    starved = {"a": {**ok["a"], "load": {**quiet["load"], "cpu_share": 0.4}}}
    assert "ran 40% of the wall time" in timing_warnings(starved)[0]
    busy = {"a": {**ok["a"], "load": {**quiet["load"], "extra_cores": 1.0}}}
    assert "busy thread" in timing_warnings(busy)[0]


def test_a_loaded_cpu_gives_a_warning_not_a_wild_ratio():
    """Busy threads on every core while a model is timed against an identical copy: the row
    carries a warning, and the ratio (p10-based under contention) stays near 1 instead of the
    wild ratios that separately timed rows gave (170x for a same-MACs model)."""
    task, model = _task(), _mlp()
    stop = threading.Event()
    data = os.urandom(1 << 20)

    def busy():
        while not stop.is_set():
            hashlib.sha256(data).digest()  # releases the GIL: real CPU load on another core

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(max(2, os.cpu_count() or 2))]
    for t in threads:
        t.start()
    try:
        rec = measure(model, task, MeasureConfig(batch_size=64, threads=1, repeats=30, memory=False),
                      reference=copy.deepcopy(model))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert rec.warnings, rec.latency
    assert rec.speedup_basis == "p10"
    assert 0.5 <= rec.speedup["eager"] <= 2.0, (rec.speedup, rec.latency)
    from rich.console import Console

    con = Console(record=True, width=200)
    con.print(format_records([rec]))
    text = con.export_text()
    assert "⚠" in text and "contended" in text


def test_rows_run_by_onnxruntime_are_named_so():
    class FakeOrt(nn.Module):
        onnx_bytes = b"graph"

    assert runtime_label("eager", FakeOrt()) == "ONNX Runtime"
    assert runtime_label("eager", nn.Linear(2, 2)) == "PyTorch eager"
    assert runtime_label("compile") == "torch.compile"


def test_peak_memory_ignores_other_threads():
    """A thread allocating 16 MiB over and over while one Linear runs: the peak is still exactly
    the Linear's output (the profiler sees every thread of the process; we keep the caller's)."""
    lin, x = nn.Linear(1000, 700), torch.randn(256, 1000)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            torch.ones(4 * 2**20).sum()

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        peak, kind = peak_memory(lambda: [lin(x) for _ in range(20)][-1])
    finally:
        stop.set()
        t.join()
    if "profiler" not in kind:
        pytest.skip(f"profiler unavailable here ({kind})")
    # 20 outputs kept in the list: 20 x 256 x 700 x 4 bytes, nothing from the other thread
    assert peak == 20 * 256 * 700 * 4

"""Measurement: one Record per model with everything a compression claim rests on.

Metric on the test split, parameters, non-zeros, bytes of the file a user would ship, MACs
(``torch.utils.flop_counter``), latency/throughput per runtime (eager, torch.compile, ONNX
Runtime) at a stated batch size and thread count, and peak memory. What one forward costs
(MACs, time, memory) lives in ``measure_latency``; this file holds the sizes, the record and
the table.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import check
from .measure_latency import (
    compare_latency,
    count_macs,
    count_macs_detail,
    latency,
    ort_runner,
    ort_session,
    peak_memory,
    torch_threads,
)
from .task import Task, call_model
from .utils import batch_size_of, model_device, to_device

__all__ = [
    "MeasureConfig",
    "Record",
    "compare_latency",
    "count_macs",
    "count_macs_detail",
    "count_nonzeros",
    "count_params",
    "file_bytes",
    "format_records",
    "latency",
    "measure",
    "ort_session",
    "peak_memory",
    "state_dict_bytes",
]

log = logging.getLogger(__name__)
RUNTIMES = ("eager", "compile", "onnxruntime")


@dataclass
class MeasureConfig:
    """What to measure and how.

    threads: intra-op threads while timing (None = torch's current setting; ORT's default).
    runtimes: any of "eager", "compile" (torch.compile) and "onnxruntime" (needs onnx_path).
    memory: peak memory of one forward (see measure_latency.peak_memory).
    """

    batch_size: int = 256
    threads: int | None = None
    warmup: int = 5
    repeats: int = 30
    latency: bool = True
    runtimes: tuple[str, ...] = ("eager",)
    onnx_path: str | None = None
    memory: bool = True
    evaluate: bool = True
    split: str = "test"

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("threads", 1), ("warmup", 0), ("repeats", 1)):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            check(
                ok or (name == "threads" and value is None),
                f"MeasureConfig.{name}",
                f"must be an integer >= {low}"
                + (" or None" if name == "threads" else "")
                + f", got {value!r}",
            )
        self.runtimes = (self.runtimes,) if isinstance(self.runtimes, str) else tuple(self.runtimes)
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        check(
            bool(self.runtimes) and not bad and len(set(self.runtimes)) == len(self.runtimes),
            "MeasureConfig.runtimes",
            f"got {self.runtimes}; name each of {RUNTIMES} at most once",
        )
        check(
            "onnxruntime" not in self.runtimes or self.onnx_path is not None,
            "MeasureConfig.onnx_path",
            "runtime 'onnxruntime' needs the path of an exported .onnx file",
        )
        check(
            self.split in ("train", "val", "test"),
            "MeasureConfig.split",
            f"must be 'train', 'val' or 'test', got {self.split!r}",
        )


@dataclass
class Record:
    """One measured row. ``latency[runtime]`` holds median/p10/p90 ms per batch of
    ``batch_size`` at ``threads`` threads; ``throughput[runtime]`` is samples per second."""

    stage: str = ""
    metric_name: str = ""
    metric: float | None = None
    extra_metrics: dict[str, float] = field(default_factory=dict)
    params: int = 0
    nonzeros: int = 0
    bytes: int = 0
    bytes_format: str = ""
    macs_per_sample: float | None = None
    macs_per_batch: int | None = None
    batch_size: int = 0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    device: str = "cpu"
    threads: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (non-finite floats become None)."""
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Inverse of to_dict; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- size
def _packed_modules(model: nn.Module):
    """torch.ao quantized Linear/Conv modules, whose weights are packed, not Parameters."""
    for m in model.modules():
        if hasattr(m, "_weight_bias") and (hasattr(m, "in_features") or hasattr(m, "in_channels")):
            yield m


def _dense(t: torch.Tensor) -> torch.Tensor | None:
    """A plain tensor with t's values (dequantized / densified), or None if t cannot say."""
    if t.is_quantized or (type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize")):
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t if type(t) in (torch.Tensor, nn.Parameter) else None


def _weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's logical weights: Parameters (shared ones once), except that a parametrized
    tensor (e.g. weight = codebook[indices] * mask) counts as the tensor it computes, not as the
    codebook and the ignored original behind it."""
    from torch.nn.utils import parametrize

    hidden: set[int] = set()
    computed: list[torch.Tensor] = []
    for m in model.modules():
        if parametrize.is_parametrized(m):
            hidden.update(id(p) for p in m.parametrizations.parameters())
            with torch.no_grad():
                computed += [getattr(m, name) for name in m.parametrizations]
    return [p for p in model.parameters() if id(p) not in hidden] + computed


def count_params(model: nn.Module) -> int:
    """Number of weights: Parameters (shared ones once, tensor subclasses by logical shape,
    parametrized tensors by their computed shape) plus the packed weights and biases of
    torch.ao quantized modules."""
    total = sum(p.numel() for p in _weight_tensors(model))
    for m in _packed_modules(model):
        w, b = m._weight_bias()
        total += w.numel() + (b.numel() if b is not None else 0)
    return int(total)


def count_nonzeros(model: nn.Module) -> int:
    """Non-zero weights over the same tensors as count_params. Quantized weights count their
    dequantized values (zero iff the stored code equals the zero point); a tensor type that can
    neither be dequantized nor counted is taken as dense (and logged)."""
    tensors = _weight_tensors(model)
    for m in _packed_modules(model):
        w, b = m._weight_bias()
        tensors += [w] + ([b] if b is not None else [])
    total = 0
    for t in tensors:
        try:
            dense = _dense(t.detach())
            total += int(torch.count_nonzero(dense if dense is not None else t.detach()))
        except Exception as exc:  # noqa: BLE001 - unknown tensor subclasses: assume dense
            log.warning(
                "count_nonzeros: %s cannot be counted (%s); taken as dense", type(t).__name__, exc
            )
            total += t.numel()
    return total


def state_dict_bytes(model: nn.Module) -> int:
    """Exact bytes of ``torch.save(model.state_dict())`` (written to memory, not disk).

    Equal to a file named ``archive.pt``; torch.save names the zip's root folder after the file
    stem, so other file names differ by a few bytes per tensor."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def file_bytes(path: str | os.PathLike) -> int:
    check(os.path.isfile(path), "saved_path", f"no such file {str(path)!r}")
    return os.path.getsize(path)


def _state_dict_format(model: nn.Module) -> str:
    dtypes = sorted(
        {
            str(t.dtype).replace("torch.", "")
            for t in model.state_dict().values()
            if isinstance(t, torch.Tensor)
        }
    )
    return f"torch.save state_dict ({'+'.join(dtypes) or 'empty'})"


# ---------------------------------------------------------------------------- the record
def _compiled_runner(model: nn.Module, inputs: Any):
    compiled = torch.compile(model)
    with torch.inference_mode():
        call_model(compiled, inputs)  # compile now, outside the timed region
    return lambda: call_model(compiled, inputs)


def _runners(model: nn.Module, inputs: Any, cfg: MeasureConfig, notes: list[str]) -> dict[str, Any]:
    runners: dict[str, Any] = {}
    for rt in cfg.runtimes:
        if rt == "eager":
            runners[rt] = lambda: call_model(model, inputs)
        elif rt == "compile":
            try:
                runners[rt] = _compiled_runner(model, inputs)
            except Exception as exc:  # noqa: BLE001 - a missing compiler should not lose the row
                notes.append(f"compile runtime skipped: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            runners[rt] = ort_runner(cfg.onnx_path, inputs, cfg.threads)
    return runners


def measure(
    model: nn.Module,
    task: Task,
    cfg: MeasureConfig | None = None,
    saved_path: str | os.PathLike | None = None,
    stage: str = "",
    bytes_format: str | None = None,
) -> Record:
    """Measure model on task. Bytes are the size of ``saved_path`` (the file a user would ship,
    described by ``bytes_format``) if given, else of the torch.save'd state dict."""
    cfg = cfg or MeasureConfig()
    device = model_device(model)
    rec = Record(stage=stage, device=str(device))
    rec.threads = cfg.threads or torch.get_num_threads()
    was_training = model.training
    model.eval()
    try:
        if cfg.evaluate:
            metrics = task.evaluate_all(model, cfg.split)
            rec.metric_name = task.metric_name
            rec.metric = metrics.pop(task.metric_name)
            rec.extra_metrics = metrics
        rec.params, rec.nonzeros = count_params(model), count_nonzeros(model)
        info = getattr(model, "info", None)
        if rec.params == 0 and isinstance(info, dict) and info.get("float_params"):
            rec.params, rec.nonzeros = info["float_params"], info.get("float_nonzeros", info["float_params"])
            rec.notes.append("params/nonzeros of the float model this runtime graph was built from")
        if saved_path is not None:
            rec.bytes = file_bytes(saved_path)
            rec.bytes_format = bytes_format or f"file {os.path.basename(saved_path)}"
        else:
            rec.bytes, rec.bytes_format = (
                state_dict_bytes(model),
                bytes_format or _state_dict_format(model),
            )
        inputs = to_device(task.example_inputs(cfg.batch_size, cfg.split), device)
        rec.batch_size = batch_size_of(inputs)
        rec.macs_per_batch, notes = count_macs_detail(model, inputs)
        rec.macs_per_sample = rec.macs_per_batch / rec.batch_size
        recorded = info.get("float_macs_per_sample") if isinstance(info, dict) else None
        if not rec.macs_per_batch and recorded:
            rec.macs_per_sample, rec.macs_per_batch = recorded, int(recorded * rec.batch_size)
            notes = [*notes, "MACs of the float model this runtime graph was built from"]
        rec.notes += notes
        if cfg.memory:
            with torch_threads(cfg.threads):
                rec.peak_memory_bytes, rec.memory_kind = peak_memory(
                    lambda: call_model(model, inputs), device
                )
        if cfg.latency:
            runners = _runners(model, inputs, cfg, rec.notes)
            rec.latency = compare_latency(runners, cfg.warmup, cfg.repeats, cfg.threads)
            rec.throughput = {
                rt: rec.batch_size / (v["median_ms"] / 1e3) for rt, v in rec.latency.items()
            }
    finally:
        model.train(was_training)
    return rec


# ---------------------------------------------------------------------------- table
def _si(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_records(records: Sequence[Record]):
    """A rich Table of records; size and speedup are relative to the first record (its first
    runtime is the latency baseline for every runtime of every row)."""
    from rich.table import Table

    names = {r.metric_name for r in records if r.metric is not None}
    runtimes = {rt for r in records for rt in r.latency}
    metric_col = names.pop() if len(names) == 1 else "metric"
    lat_col = f"{runtimes.pop()} ms" if len(runtimes) == 1 else "latency ms"
    table = Table(title="torchslim measurements")
    for col in ("stage", metric_col, "params", "nonzeros", "KB (×)", "MACs", lat_col, "speedup"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    if not records:
        return table
    first = records[0]
    base = next(iter(first.latency.values()), None)
    for r in records:
        metric = "-" if r.metric is None else f"{r.metric:.4f}"
        if metric_col == "metric" and r.metric is not None:
            metric = f"{r.metric_name} {metric}"
        ratio = f"{first.bytes / r.bytes:.1f}×" if r.bytes else "-"
        tag = (lambda rt: f" {rt}") if lat_col == "latency ms" else (lambda rt: "")
        lat = [f"{v['median_ms']:.3f}{tag(rt)}" for rt, v in r.latency.items()]
        speed = [
            f"{base['median_ms'] / v['median_ms']:.2f}×" if base else "-"
            for v in r.latency.values()
        ]
        table.add_row(
            r.stage or "-",
            metric,
            f"{r.params:,}",
            f"{r.nonzeros:,}",
            f"{r.bytes / 1024:.1f} ({ratio})",
            _si(r.macs_per_sample),
            "\n".join(lat) or "-",
            "\n".join(speed) or "-",
        )
    return table

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
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..bounds import check_bounds, count
from ..config_base import config
from ..errors import check
from ..isa import machine_facts
from ..task import Task, call_model
from ..utils import batch_size_of, eval_mode, jsonable, model_device, to_device
from .latency import (
    compare_latency,
    count_macs,
    count_macs_detail,
    latency,
    ort_session,
    torch_threads,
)
from .memory import peak_memory
from .timing import time_model

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


@config
class MeasureConfig:
    """What to measure and how.

    threads: intra-op threads while timing (None = torch's current setting; ORT's default).
    runtimes: any of "eager", "compile" (torch.compile) and "onnxruntime" (needs onnx_path).
    memory: peak memory of one forward (see measure_latency.peak_memory).
    """

    batch_size: int = count(256, 1, 65536)
    threads: int | None = count(None, 1, 1024, optional=True)
    warmup: int = count(5, 0, 10_000)
    repeats: int = count(30, 1, 100_000)
    latency: bool = True
    runtimes: tuple[str, ...] = ("eager",)
    onnx_path: str | None = None
    memory: bool = True
    evaluate: bool = True
    split: str = "test"

    def __post_init__(self) -> None:
        check_bounds(self)
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
    # what executed each latency key ("PyTorch eager", "ONNX Runtime", "torch.compile")
    runtime_labels: dict[str, str] = field(default_factory=dict)
    # speedup per runtime against a reference timed in the same repeats (measure(reference=))
    speedup: dict[str, float] = field(default_factory=dict)
    speedup_basis: str | None = None  # "median", or "p10" when the timing was contended
    reference_latency: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)  # figures not to trust as they stand
    flags: list[str] = field(default_factory=list)  # quality flags (the runner's guard, untrained)
    machine: dict[str, Any] = field(default_factory=dict)  # CPU, ISA facts, threads (isa.py)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (non-finite floats become None)."""
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Inverse of to_dict; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
def measure(
    model: nn.Module,
    task: Task,
    cfg: MeasureConfig | None = None,
    saved_path: str | os.PathLike | None = None,
    stage: str = "",
    bytes_format: str | None = None,
    reference: nn.Module | None = None,
) -> Record:
    """Measure model on task. Bytes are the size of ``saved_path`` (the file a user would ship,
    described by ``bytes_format``) if given, else of the torch.save'd state dict.

    Latency is of the shipped form (parametrizations materialized, see measure_timing). With a
    ``reference`` (e.g. the baseline) it is timed interleaved with the model in the same
    repeats, and ``Record.speedup`` is their ratio; contended timings carry ``warnings``."""
    cfg = cfg or MeasureConfig()
    device = model_device(model)
    rec = Record(stage=stage, device=str(device))
    rec.threads = cfg.threads or torch.get_num_threads()
    rec.machine = machine_facts(rec.threads)
    with eval_mode(model):
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
            timed = time_model(model, inputs, cfg, reference)
            rec.latency, rec.runtime_labels = timed["latency"], timed["runtime_labels"]
            rec.speedup, rec.speedup_basis = timed["speedup"], timed["speedup_basis"]
            rec.reference_latency, rec.warnings = timed["reference_latency"], timed["warnings"]
            rec.notes += timed["notes"]
            rec.throughput = {
                rt: rec.batch_size / (v["median_ms"] / 1e3) for rt, v in rec.latency.items()
            }
            for w in rec.warnings:
                log.warning("%s: latency %s", stage or "measure", w)
    return rec


from .table import format_records  # re-exported here; it needs Record, defined above

"""From a simulated (fake-quant) model and its per-layer plan to a model on real int8 kernels.

``convert(model, plan, cfg, task)`` maps the QuantConfig onto a backend's own settings:

- ONNX Runtime: granularity "per_group" (dynamic or weights only) -> MatMul weights as
  MatMulNBits blocks of group_size (int8 compute with per-block activation scales when
  dynamic, float compute when weights only), other ops via quantize_dynamic; mode "static" -> quantize_static (QDQ, the same calibration method where ORT
  has it; "mse" has no ORT calibrator and uses Percentile), "dynamic" -> quantize_dynamic,
  "weights_only" -> quantize_dynamic (ORT has no int8 weight-only kernel); per-tensor vs
  per-channel as configured; plan layers at float -> nodes_to_exclude.
- torchao: int8 with activations -> Int8DynamicActivationInt8Weight (torchao's CPU int8 path
  quantizes activations per token at run time), int8 weights only -> Int8WeightOnly, <= 4-bit
  weights only -> IntxWeightOnly int4.
- "auto": builds both, times them side by side (interleaved, median) against the fp32 model
  at the task's batch size, keeps the fastest and records every figure in the info, with the
  CPU's ISA. A path known to be slow on this CPU (torchao int8_dynamic in eager on x86 without
  VNNI, ~20x slower than fp32 there; isa_plan.py) is not built, and says so in ``skipped``.
- CPU-dependent ONNX Runtime choices (reduce_range, from ``ort_options`` or the ISA) are made
  by isa_plan.py; the simulation uses the same weight grid (ptq.wrap).

The simulated model is the reference: info carries the largest output difference between the
real model and the simulation on one test batch.
"""

from __future__ import annotations

import glob
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import isa
from ..core.errors import ConfigError
from ..core.selection import LayerSelection
from ..core.stage import StageResult
from ..core.task import Task, as_tensor, call_model
from .isa_plan import torchao_known_slow
from .ort_backend import OrtModel, OrtQuantConfig, ort_quantize
from .torchao_backend import TorchaoConfig, defake, save_torchao, torchao_quantize


def float_layers_of(plan: list[Any]) -> tuple[str, ...]:
    """Layer names a plan keeps in float (``LayerChoice.bits is None``)."""
    return tuple(c.layer for c in plan if getattr(c, "bits", 8) is None)


def kept_float(plan: list[Any]) -> LayerSelection:
    """The backends' ``layers``: everything but the plan's float layers, each named exactly
    (``glob.escape``: a name is a pattern that matches itself only)."""
    return LayerSelection(exclude=tuple(glob.escape(n) for n in float_layers_of(plan)))


def ort_config_from(cfg: Any, plan: list[Any]) -> tuple[OrtQuantConfig, list[str]]:
    """(OrtQuantConfig equivalent of a QuantConfig, notes on what could not be mapped)."""
    notes = []
    mode = {"static": "static", "dynamic": "dynamic", "weights_only": "dynamic"}[cfg.mode]
    if cfg.mode == "weights_only" and cfg.granularity != "per_group":
        notes.append("ONNX Runtime's weight-only kernel (MatMulNBits) is per group; per-tensor/channel "
                     "weights-only runs with dynamically quantized activations")
    calib = cfg.calibration if cfg.calibration in ("minmax", "percentile", "entropy") else "percentile"
    if cfg.mode == "static" and calib != cfg.calibration:
        notes.append(f"ONNX Runtime has no {cfg.calibration!r} calibrator; used 'percentile'")
    low = sorted({c.bits for c in plan if c.bits is not None and c.bits != 8})
    if (cfg.bits != 8 or low) and cfg.granularity != "per_group":
        notes.append(f"ONNX Runtime int8 kernels run {low or [cfg.bits]}-bit layers at 8 bits")
    block = {}
    if cfg.granularity == "per_group":
        if cfg.mode == "static":
            notes.append("ONNX Runtime has no static per-group kernel; weights per channel instead")
        elif cfg.group_size in (16, 32, 64, 128, 256):
            block = {"block_bits": 8 if cfg.bits > 4 else 4, "block_size": cfg.group_size,
                     "block_int8_compute": cfg.mode == "dynamic"}
            mode = "dynamic"
            if cfg.bits not in (4, 8):
                notes.append(f"MatMulNBits has 4- and 8-bit blocks; {cfg.bits}-bit layers use {block['block_bits']}")
        else:
            notes.append("MatMulNBits needs a group size of 16..256 (power of 2); per channel used")
    pct = cfg.calibration_param if cfg.calibration == "percentile" and cfg.calibration_param else 99.999
    # ort_options (e.g. block_layers, smooth_alpha: the B2 plan) override what is derived above
    fields = {"mode": mode, "per_channel": cfg.granularity != "per_tensor", "calibration": calib, "percentile": pct,
              "batches": cfg.batches, "layers": kept_float(plan), **block,
              **getattr(cfg, "ort_options", {})}
    ocfg = OrtQuantConfig(**fields)
    return ocfg, notes


def torchao_config_from(cfg: Any, plan: list[Any]) -> TorchaoConfig:
    if cfg.mode == "weights_only":
        scheme = "int8_weight_only" if cfg.bits > 4 else "int4_weight_only"
    elif cfg.bits == 8:
        scheme = "int8_dynamic"
    else:
        raise ConfigError(f"QuantConfig.bits: torchao on CPU has no {cfg.bits}-bit weight + int8 activation "
                          "kernel; use bits=8, mode='weights_only' (int4) or backend='onnxruntime'")
    gs = cfg.group_size if cfg.group_size in (16, 32, 64, 128, 256) else 32
    return TorchaoConfig(scheme=scheme, group_size=gs, layers=kept_float(plan))


def _agreement(real: nn.Module, reference: nn.Module, inputs: Any) -> float:
    with torch.no_grad():
        a = as_tensor(call_model(real, inputs)).float()
        b = as_tensor(call_model(reference, inputs)).float()
    return float((a - b).abs().max())


def _with_float_macs(real: nn.Module, float_model: nn.Module, task: Task) -> None:
    """ONNX Runtime graphs hide their ops and weights from torch's counters: record the float
    model's MACs, parameters and non-zeros on the runtime model so ``measure`` can report them
    (stated as such in the record's notes)."""
    from ..core.measure import count_macs, count_nonzeros, count_params

    inputs = task.example_inputs()
    if isinstance(getattr(real, "info", None), dict):
        real.info["float_macs_per_sample"] = count_macs(float_model, inputs) / _batch(inputs)
        real.info["float_params"] = count_params(float_model)
        real.info["float_nonzeros"] = count_nonzeros(float_model)


def to_onnxruntime(model: nn.Module, plan: list[Any], cfg: Any, task: Task) -> StageResult:
    ocfg, notes = ort_config_from(cfg, plan)
    res = ort_quantize(model, task.example_inputs(), ocfg, task)
    if ocfg.block_bits and not res.info["quantized_nodes"].get("MatMulNBits"):
        notes.append("no MatMul node took MatMulNBits (Gemm/Conv layers use quantize_dynamic per channel)")
    info = {**res.info, "notes": notes, "file_bytes": res.model.file_bytes, "file_format": "onnx"}
    info["max_abs_diff_vs_simulated"] = _agreement(res.model, model, task.example_inputs())
    _with_float_macs(res.model, model, task)
    return StageResult(res.model, info, save=save)


def to_torchao(model: nn.Module, plan: list[Any], cfg: Any, task: Task) -> StageResult:
    tcfg = torchao_config_from(cfg, plan)
    slow = torchao_known_slow(tcfg.scheme, tcfg.compile)
    if slow:  # the user's explicit choice ("auto" never builds it): honoured, said once
        warnings.warn(f"QuantConfig.backend='torchao' ({tcfg.scheme}): {slow}; backend='onnxruntime' is the "
                      "fast int8 path on this CPU", stacklevel=3)
    q, info = torchao_quantize(model, tcfg)
    if slow:
        info["known_slow_here"] = slow
    try:
        info["max_abs_diff_vs_simulated"] = _agreement(q, model, task.example_inputs())
    except (NotImplementedError, RuntimeError) as exc:
        # torchao's int8 tensors implement the ops of a Linear call; a parent that reads the
        # weight itself (nn.MultiheadAttention, HF ViT) needs ops they lack (aten.t, aten.view)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"QuantConfig.backend='torchao': the quantized model cannot run ({first}); a module "
                          "reads a quantized layer's weight directly; use backend='onnxruntime' or skip that layer") from None
    info["file_bytes"], info["file_format"] = saved_bytes(q), "torch.save state_dict (torchao)"
    return StageResult(q, info, save=save)


def auto(model: nn.Module, plan: list[Any], cfg: Any, task: Task) -> StageResult:
    """Build every real backend that accepts cfg, time them side by side, keep the fastest."""
    from ..core.measure import compare_latency

    built: dict[str, StageResult] = {}
    skipped: dict[str, str] = {}
    for name, fn in (("onnxruntime", to_onnxruntime), ("torchao", to_torchao)):
        slow = _known_slow(name, cfg, plan)
        if slow:
            skipped[name] = f"not built: known slow on this CPU ({isa.cpu_isa()['summary']}): {slow}"
            continue
        try:
            built[name] = fn(model, plan, cfg, task)
        except OSError:  # a full disk or a permission error is not the model's fault: stop
            raise
        except Exception as exc:  # noqa: BLE001 - a backend that cannot take this model is skipped, with why
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if not built:
        raise ConfigError("QuantConfig.backend: no real backend could convert this model (" +
                          "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "); use backend='simulate'")
    inputs = task.example_inputs()
    fp32 = defake(model).eval()
    cands = {"fp32_eager": lambda: call_model(fp32, inputs)}
    cands.update({k: (lambda m=r.model: call_model(m, inputs)) for k, r in built.items()})
    lat = compare_latency(cands, warmup=3, repeats=15)
    best = min(built, key=lambda k: lat[k]["median_ms"])
    chosen = built[best]
    chosen.info["auto"] = {
        "chosen": best, "why": f"fastest at batch {_batch(inputs)} on this machine ({torch.get_num_threads()} threads)",
        "median_ms": {k: v["median_ms"] for k, v in lat.items()},
        "speedup_vs_fp32_eager": {k: lat["fp32_eager"]["median_ms"] / lat[k]["median_ms"] for k in built},
        "skipped": skipped, "isa": isa.describe(),
    }
    return chosen


def _known_slow(name: str, cfg: Any, plan: list[Any]) -> str | None:
    if name != "torchao":
        return None
    try:
        tcfg = torchao_config_from(cfg, plan)
    except ConfigError:
        return None  # to_torchao will fail with the reason, recorded in skipped
    return torchao_known_slow(tcfg.scheme, tcfg.compile)


def _batch(inputs: Any) -> int:
    from ..core.utils import batch_size_of

    return batch_size_of(inputs)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the real artifact: the .onnx of an OrtModel, else torch.save of the state dict."""
    if isinstance(model, OrtModel):
        model.save(path)
    else:
        save_torchao(model, str(path))


def saved_bytes(model: nn.Module) -> int:
    """Bytes of the file ``save`` writes for model."""
    if isinstance(model, OrtModel):
        return model.file_bytes
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "model.pt"
        save(model, p)
        return p.stat().st_size


def convert(model: nn.Module, plan: list[Any], cfg: Any, task: Task) -> StageResult:
    """Dispatch on ``cfg.backend`` ("onnxruntime", "torchao" or "auto")."""
    fn = {"onnxruntime": to_onnxruntime, "torchao": to_torchao, "auto": auto}.get(cfg.backend)
    if fn is None:
        raise ConfigError(f"QuantConfig.backend: convert handles 'onnxruntime', 'torchao', 'auto', got {cfg.backend!r}")
    return fn(model, plan, cfg, task)

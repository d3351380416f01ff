"""Post-training quantization (simulated) and the quantize stage.

``simulate(model, cfg, task)`` returns a copy of the model in which every quantizable layer is
a ``FakeQuantLayer``: BatchNorm folded, optionally equalized / smoothed, activation ranges
calibrated, bias corrected, mixed precision searched, QAT fine-tuned — in that order.
``export_weights(qmodel)`` gives the integer weights and scales (``QuantizedWeights``) that the
real backends consume, and ``save_quantized`` writes them (int4 packed two per byte).

``apply`` is the stage: for ``backend="simulate"`` it returns the fake-quant model; for a real
backend it hands the simulated model and the per-layer plan to the converter registered in
``config.BACKENDS``.

The simulation models the backend named in the config: with ``backend="onnxruntime"`` (or
"auto") on a CPU where ONNX Runtime uses 7-bit weights (``reduce_range``, see isa_plan.py) the
8-bit weights are simulated on that grid ([-64, 64]), so simulation and runtime stay equal.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.stage import StageResult, register_stage
from ..core.task import Task
from ..core.utils import atomic_write
from . import calibrate, mixed, qat, smooth
from .config import QuantConfig, backend_converter, quantizable_layers, validate_for_model
from .fake import ActQuantizer, FakeQuantLayer, WeightQuantizer
from .isa_plan import sim_reduce_range


@dataclass
class LayerQuant:
    """Integer weights of one layer and what a kernel needs to use them.

    weight: integers shaped like the float weight (int8, or uint8 for asymmetric);
    scale / zero_point: shape (), (out,) or (out, in // group_size) (see fake.scale_shape);
    input_divisor: SmoothQuant per-input-channel divisor applied to x before quantizing it;
    act: None (weights only) or {"mode": "static"|"dynamic", "bits", "symmetric", and for static
    "scale" and "zero_point"}.
    """

    name: str
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None
    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bias: torch.Tensor | None
    input_divisor: torch.Tensor | None = None
    act: dict[str, Any] | None = None

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the simulation used (for checking a backend against it)."""
        w = self.weight.to(torch.float32)
        if self.granularity == "per_group":
            rows = w.reshape(-1, self.group_size)
            return ((rows - self.zero_point.reshape(-1, 1)) * self.scale.reshape(-1, 1)).reshape(w.shape)
        shape = (-1,) + (1,) * (w.dim() - 1) if self.granularity == "per_channel" else ()
        return (w - self.zero_point.reshape(shape)) * self.scale.reshape(shape)


@dataclass
class QuantizedWeights:
    """Every quantized layer by name, and the layers left in float with the reason."""

    layers: dict[str, LayerQuant]
    float_layers: dict[str, str] = field(default_factory=dict)


def wrap(model: nn.Module, cfg: QuantConfig) -> dict[str, str]:
    """Replace quantizable layers of model (in place) by FakeQuantLayers; return float layers."""
    ok, float_layers = quantizable_layers(model)
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    for name, layer in ok.items():
        bits = cfg.bits_for(name)
        if bits is None:
            float_layers[name] = "kept float by the config"
            continue
        wq = WeightQuantizer(bits, cfg.weight_scheme == "symmetric", cfg.granularity, cfg.group_size, cfg.weight_observer)
        wq.reduce_range = sim_reduce_range(cfg, name)  # ONNX Runtime's 7-bit weights, where it will use them
        aq = None
        if cfg.mode != "weights_only":
            aq = ActQuantizer(cfg.act_bits, cfg.act_scheme == "symmetric", dynamic=cfg.mode == "dynamic")
        fq = FakeQuantLayer(layer, wq, aq)
        for alias in aliases.get(id(layer), [name]):  # a module registered twice: one wrapper
            model.set_submodule(alias, fq)
        _module_path(model, name)
    cannot = {n: r for n, r in float_layers.items() if r != "kept float by the config"}
    if cannot:
        warnings.warn("left in float (cannot be quantized): " + "; ".join(f"{n}: {r}" for n, r in cannot.items()), stacklevel=2)
    return float_layers


def _module_path(model: nn.Module, name: str) -> None:
    """nn.TransformerEncoderLayer's fused fast path (eval, no grad) calls one kernel with its
    Linears' raw tensors and never runs their forward, so a fake-quantized Linear inside it
    would lose its activation quantization. ``activation_relu_or_gelu`` is read only to choose
    that path (the slow path applies ``self.activation`` itself); setting it False makes the
    layer run its submodules, with the same math."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        parent.activation_relu_or_gelu = False


MIN_CALIBRATION_SAMPLES = 64


def _warn_small_calibration(batches: list[Any], info: dict[str, Any]) -> None:
    """Static ranges are the ranges the calibration data reached: from a handful of samples,
    later inputs beyond them are clipped (a 1-feature MLP calibrated on 16 samples loses a third
    of its output norm). Said once, with the fix, instead of deviating silently."""
    from ..core.utils import batch_size_of

    n = sum(batch_size_of(b) for b in batches)
    info["calibration_samples"] = n
    if n < MIN_CALIBRATION_SAMPLES:
        warnings.warn(f"QuantConfig.batches: static calibration saw only {n} samples; activation "
                      f"ranges fit them and larger inputs will be clipped. Give >= {MIN_CALIBRATION_SAMPLES} "
                      "samples (more batches or a larger train split) or use mode='dynamic'", stacklevel=3)


def set_layer_bits(model: nn.Module, name: str, bits: int | None) -> None:
    """Quantize layer ``name`` at ``bits`` (re-deriving its weight scales), or run it float."""
    layer = model.get_submodule(name)
    layer.enabled = bits is not None
    if bits is not None and bits != layer.wq.bits:
        layer.wq.bits = bits
        layer.wq.calibrate(layer.layer.weight)


def _decision_split(task: Task) -> str:
    return "val" if task.val is not None else "test"


def simulate(model: nn.Module, cfg: QuantConfig, task: Task) -> tuple[nn.Module, dict[str, Any]]:
    """A fake-quantized copy of model and a record of every step (see the module docstring)."""
    validate_for_model(cfg, model, task)
    q = copy.deepcopy(model).eval()
    has_data = task.train is not None or task.val is not None
    batches = calibrate.calibration_inputs(task, cfg.batches) if has_data else []
    probe = batches[0] if batches else task.example_inputs()
    info: dict[str, Any] = {"calibration_batches": len(batches)}
    if cfg.fold_bn:
        q, info["folded_bn"] = smooth.fold_batchnorm(q, probe)
    if cfg.equalize:
        q, pairs = smooth.equalize(q, probe)
        info["equalized_pairs"] = [list(p) for p in pairs]
    info["float_layers"] = wrap(q, cfg)
    reduced = [n for n, m in calibrate.fq_layers(q).items() if m.wq.reduce_range]
    if reduced:  # the backend's 7-bit weights (ORT reduce_range on this CPU), modeled exactly
        info["weight_reduce_range"] = {"layers": reduced, "qrange": list(q.get_submodule(reduced[0]).wq.qmin_qmax)}
    if cfg.smooth_alpha is not None and cfg.mode != "weights_only":
        info["smoothquant_max_scale"] = smooth.smooth_quant(q, batches, cfg.smooth_alpha)
    if cfg.mode == "static":
        info["act_ranges"] = calibrate.calibrate_activations(q, batches, cfg.calibration, cfg.calibration_param, cfg.seed)
        _warn_small_calibration(batches, info)
    plan = [mixed.LayerChoice(n, m.wq.bits) for n, m in calibrate.fq_layers(q).items()]
    if cfg.wants_mixed:
        split = _decision_split(task)
        plan, info["mixed"] = mixed.search_plan(
            {c.layer: c.bits for c in plan}, lambda n, b: set_layer_bits(q, n, b), lambda: task.evaluate(q, split),
            cfg.max_drop, cfg.min_metric, cfg.fallback_bits)
        info["mixed"]["split"] = split
    if cfg.bias_correction and batches:
        info["bias_correction_max"] = calibrate.correct_bias(q, batches)
    if cfg.wants_qat:
        info["qat"] = qat.finetune(q, task, cfg).to_dict()
    info["plan"] = [c.to_dict() for c in plan]
    return q.eval(), info


@torch.no_grad()
def export_weights(model: nn.Module) -> QuantizedWeights:
    """Integer weights, scales and activation parameters of every enabled FakeQuantLayer."""
    layers, float_layers = {}, {}
    for name, m in calibrate.fq_layers(model).items():
        if not m.enabled:
            float_layers[name] = "kept float by the mixed-precision plan"
            continue
        w, scale, zp = m.wq.integer_weights(m.layer.weight)
        dtype = torch.int8 if m.wq.symmetric else torch.uint8
        act = None
        if m.aq is not None:
            act = {"mode": "dynamic" if m.aq.dynamic else "static", "bits": m.aq.bits, "symmetric": m.aq.symmetric}
            if not m.aq.dynamic:
                act.update(scale=float(m.aq.scale), zero_point=int(m.aq.zero_point))
        bias = None if m.layer.bias is None else m.layer.bias.detach().clone()
        div = None if m.input_divisor is None else m.input_divisor.detach().clone()
        gs = m.wq.group_size if m.wq.granularity == "per_group" else None
        layers[name] = LayerQuant(name, m.wq.bits, m.wq.symmetric, m.wq.granularity, gs, w.to(dtype), scale, zp, bias, div, act)
    return QuantizedWeights(layers, float_layers)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Two 4-bit values per byte (offset to unsigned); 8-bit-ish widths stay one per byte."""
    if bits > 4:
        return q
    u = (q.to(torch.int16) + (8 if q.dtype == torch.int8 else 0)).to(torch.uint8).reshape(-1)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return (u[0::2] | (u[1::2] << 4)).contiguous()


def save_quantized(model: nn.Module, path: str) -> None:
    """torch.save of the float tensors that stay float plus packed integer weights and scales."""
    qw = export_weights(model)
    drop = tuple(f"{n}.{k}" for n in qw.layers for k in ("layer.weight", "wq.scale", "wq.zero_point"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(drop)}
    for name, lq in qw.layers.items():
        state[f"{name}.qweight"] = _pack(lq.weight, lq.bits)
        state[f"{name}.qshape"] = torch.tensor(lq.weight.shape)
        state[f"{name}.scale"] = lq.scale
        if not lq.symmetric:  # symmetric zero points are all 0
            state[f"{name}.zero_point"] = lq.zero_point.to(torch.uint8)
    from ..export.digest import stamp_state

    state = stamp_state({k: v.detach().cpu().contiguous() for k, v in state.items()})
    atomic_write(path, lambda p: torch.save(state, p))


def _backend(cfg: QuantConfig) -> tuple[Any, str | None]:
    """(convert function or None, why the simulation is returned instead)."""
    if cfg.backend == "simulate":
        return None, None
    try:
        fn = backend_converter(cfg.backend)
    except ImportError as exc:
        if cfg.backend == "auto":
            return None, f"no real backend can run here ({exc}); returning the simulated (fake-quant) model"
        raise ConfigError(f"QuantConfig.backend: {cfg.backend!r} needs a library that is not installed ({exc}); "
                          "pip install 'torchslim[quant,onnx]' or use backend: simulate") from None
    return fn, None


@register_stage(QuantConfig, copy_input=False)  # simulate quantizes its own copy
def apply(model: nn.Module, cfg: QuantConfig, task: Task) -> StageResult:
    """Quantize model for task: simulated, then converted by the configured backend."""
    validate_for_model(cfg, model, task)
    convert, why = _backend(cfg)
    qmodel, info = simulate(model, cfg, task)
    if convert is None:
        info["backend"] = "simulate"
        if why:
            info["why_simulated"] = why
        return StageResult(qmodel, info, save=save_quantized)
    plan = [mixed.LayerChoice(d["layer"], None if d["bits"] == "float" else d["bits"], d["sensitivity"]) for d in info["plan"]]
    # layers the config keeps float (skip, layer_bits None) are not wrapped, so not in the
    # simulation's plan: hand them to the backend as float too, or it quantizes them anyway
    planned = {c.layer for c in plan}
    plan += [mixed.LayerChoice(n, None) for n, why in info.get("float_layers", {}).items()
             if why == "kept float by the config" and n not in planned]
    result = convert(qmodel, plan, cfg, task)
    result.info = {**info, **result.info}
    return result

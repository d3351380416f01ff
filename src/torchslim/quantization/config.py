"""QuantConfig: one validated description of a quantization run, plus the backend registry.

Everything is checked in ``__post_init__`` (values) or ``validate_for_model`` (values that
depend on the model and the task, e.g. a group size that must divide every layer's input), so a
bad configuration fails with a one-line ConfigError before any calibration or training.

Backends (torchao, ONNX Runtime, ...) plug in through ``register_backend(name)``: a function
``convert(model, plan, cfg, task) -> StageResult`` that turns the simulated model and its
per-layer plan into a model running on real low-bit kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

from torch import nn

from ..core.bounds import bounded, check_bounds, count, seed_field
from ..core.config_base import config
from ..core.errors import check
from ..core.selection import Layers, layers_field
from ..core.train import TrainConfig

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
MODES = ("weights_only", "static", "dynamic")
CALIBRATIONS = ("minmax", "percentile", "mse", "entropy")
WEIGHT_OBSERVERS = ("minmax", "mse")

# Default parameter of each calibration method: percentile (in %), MSE grid points, entropy bins.
DEFAULT_CALIBRATION_PARAM = {"minmax": None, "percentile": 99.99, "mse": 100, "entropy": 2048}

#: The one backend registry: ``QuantConfig.backend`` name -> ``convert(model, plan, cfg, task) ->
#: StageResult``, or "module:function" imported on first use (so that naming a backend needs none
#: of its libraries until it runs), or None for "simulate" (the fake-quant model itself).
BACKENDS: dict[str, Callable[..., Any] | str | None] = {
    "simulate": None,
    "onnxruntime": "torchslim.quantization.convert:to_onnxruntime",
    "torchao": "torchslim.quantization.convert:to_torchao",
    "auto": "torchslim.quantization.convert:auto",
}


def register_backend(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``convert(model, plan, cfg, task) -> StageResult`` for ``QuantConfig.backend``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        BACKENDS[name] = fn
        return fn

    return deco


def backend_converter(name: str) -> Callable[..., Any] | None:
    """The convert function registered for ``name`` (imported now if it was registered by path);
    None for "simulate". ImportError when the backend's libraries are not installed."""
    entry = BACKENDS[name]
    if isinstance(entry, str):
        import importlib

        module, _, attr = entry.partition(":")
        entry = BACKENDS[name] = getattr(importlib.import_module(module), attr)
    return entry


def _check_ort_options(options: dict[str, Any]) -> None:
    """ort_options are extra OrtQuantConfig fields (e.g. block_layers, smooth_alpha)."""
    check(isinstance(options, dict), "QuantConfig.ort_options", "must be a mapping of OrtQuantConfig fields")
    if not options:
        return
    import dataclasses

    from .ort_backend import OrtQuantConfig  # only when used: it needs onnxruntime

    known, renamed = {f.name for f in dataclasses.fields(OrtQuantConfig)}, OrtQuantConfig.__renamed__
    old = next((k for k in options if k in renamed), None)
    check(old is None, f"QuantConfig.ort_options.{old}", f"renamed — write {renamed.get(old)}")
    bad = sorted(set(options) - known)
    check(not bad, "QuantConfig.ort_options", f"unknown OrtQuantConfig field {bad[:1]}; known: {', '.join(sorted(known))}")


@config(renamed={"skip": "layers: {exclude: [...]}", "calibration_batches": "batches",
                 "qat_epochs": "finetune: {epochs: N}", "qat_steps": "finetune: {max_steps: N}",
                 "qat_lr": "finetune: {lr: X}"}, stage="quantize")
class QuantConfig:
    """How to quantize.

    bits / act_bits: integer width of weights / input activations (2..8).
    weight_scheme / act_scheme: "symmetric" (zero point 0, signed) or "asymmetric" (unsigned
        with a zero point); activations default to asymmetric (post-ReLU ranges are one-sided).
    granularity: weight scales "per_tensor", "per_channel" (one per output channel) or
        "per_group" (``group_size`` consecutive input weights of one output share a scale).
    weight_observer: "minmax" or "mse" (MSE-optimal clipping per scale group; helps at 4 bits).
    mode: "weights_only", "static" (activation ranges calibrated on data) or "dynamic"
        (activation range taken from each batch at run time).
    calibration / calibration_param: activation range method for static mode and its parameter
        (percentile in %, MSE grid points, entropy histogram bins); None = the method's default.
    batches: batches of the task's train split (val if no train) used to calibrate.
    layers: which layers are quantized (a LayerSelection; ``layers: {exclude: ["classifier.*"]}``
        keeps those in float; default every supported layer).
    layer_bits: per-layer weight bits overriding ``bits`` (None = keep that layer float); this is
        how a mixed-precision plan is replayed.
    max_drop / min_metric: accuracy-aware mixed precision; when either is set, the most sensitive
        layers are raised to ``fallback_bits`` (None = float) until metric >= baseline - max_drop
        (and >= min_metric). Metric units are the task's (accuracy in [0, 1]: 0.005 = 0.5 pt).
    bias_correction / smooth_alpha / equalize: optional PTQ improvements (mean-error bias
        correction, SmoothQuant migration strength in (0, 1), cross-layer equalization).
    fold_bn: fold BatchNorm into the preceding conv/linear before quantizing, as real backends do.
    finetune: the quantization-aware fine-tuning budget (a TrainConfig, as everywhere training
        happens; QAT runs when it is set, e.g. ``finetune: {epochs: 2, lr: 1e-4}``; None = PTQ only).
    learnable_scales: QAT also trains the scales (LSQ) along with the weights.
    backend: "simulate" (fake-quant model), "torchao", "onnxruntime" or "auto" (the best real
        backend registered, else simulate with the reason recorded).
    ort_options: OrtQuantConfig fields for the ONNX Runtime backend (block_layers, smooth_alpha,
        reduce_range, ...). reduce_range left out = decided by this CPU: 7-bit weights where
        ORT's int8 products saturate (x86 without VNNI), and the simulation uses the same grid.
    """

    bits: int = bounded(8, 2, 8, integer=True)
    act_bits: int = bounded(8, 2, 8, integer=True)
    weight_scheme: str = "symmetric"
    act_scheme: str = "asymmetric"
    granularity: str = "per_channel"
    group_size: int = count(128, 1, 65536)
    weight_observer: str = "minmax"
    mode: str = "static"
    calibration: str = "percentile"
    calibration_param: float | None = bounded(None, 0, 1e6, low_open=True)
    batches: int = count(8, 1, 100_000)
    layers: Layers = layers_field()
    layer_bits: dict[str, int | None] = field(default_factory=dict)
    max_drop: float | None = bounded(None, 0, 1e9)
    min_metric: float | None = bounded(None, -1e9, 1e9)
    fallback_bits: int | None = bounded(None, 3, 8, integer=True)
    bias_correction: bool = False
    smooth_alpha: float | None = bounded(None, 0, 1, low_open=True, high_open=True)
    equalize: bool = False
    fold_bn: bool = True
    finetune: TrainConfig | None = None
    learnable_scales: bool = False
    backend: str = "simulate"
    seed: int = seed_field()
    ort_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bounds(self)
        _check_ort_options(self.ort_options)
        for name in ("bits", "act_bits"):
            v = getattr(self, name)
            check(isinstance(v, int) and 2 <= v <= 8, f"QuantConfig.{name}", f"must be an integer in 2..8, got {v!r}")
        check(self.weight_scheme in SCHEMES, "QuantConfig.weight_scheme", f"must be one of {SCHEMES}, got {self.weight_scheme!r}")
        check(self.act_scheme in SCHEMES, "QuantConfig.act_scheme", f"must be one of {SCHEMES}, got {self.act_scheme!r}")
        check(self.granularity in GRANULARITIES, "QuantConfig.granularity", f"must be one of {GRANULARITIES}, got {self.granularity!r}")
        check(isinstance(self.group_size, int) and self.group_size >= 1, "QuantConfig.group_size", f"must be an integer >= 1, got {self.group_size!r}")
        check(self.weight_observer in WEIGHT_OBSERVERS, "QuantConfig.weight_observer", f"must be one of {WEIGHT_OBSERVERS}, got {self.weight_observer!r}")
        check(self.mode in MODES, "QuantConfig.mode", f"must be one of {MODES}, got {self.mode!r}")
        check(self.calibration in CALIBRATIONS, "QuantConfig.calibration", f"must be one of {CALIBRATIONS}, got {self.calibration!r}")
        self._check_calibration_param()
        check(isinstance(self.batches, int) and self.batches >= 1, "QuantConfig.batches",
              f"must be an integer >= 1, got {self.batches!r}")
        for layer, b in self.layer_bits.items():
            check(b is None or (isinstance(b, int) and 2 <= b <= 8), "QuantConfig.layer_bits", f"{layer!r}: bits must be in 2..8 or None (float), got {b!r}")
        check(self.max_drop is None or self.max_drop >= 0, "QuantConfig.max_drop", f"must be >= 0 or None, got {self.max_drop!r}")
        check(self.fallback_bits is None or (isinstance(self.fallback_bits, int) and self.bits < self.fallback_bits <= 8),
              "QuantConfig.fallback_bits", f"must be None (float) or an integer in {self.bits + 1}..8 (above bits), got {self.fallback_bits!r}")
        check(self.smooth_alpha is None or 0 < self.smooth_alpha < 1, "QuantConfig.smooth_alpha", f"must be in (0, 1) or None, got {self.smooth_alpha!r}")
        check(self.backend in BACKENDS, "QuantConfig.backend", f"must be one of {tuple(BACKENDS)}, got {self.backend!r}")
        check(not (self.learnable_scales and self.finetune is None), "QuantConfig.learnable_scales",
              "only has an effect with QAT; set finetune (e.g. finetune: {epochs: 2, lr: 1e-4})")

    def _check_calibration_param(self) -> None:
        p = self.calibration_param
        if p is None:
            self.calibration_param = DEFAULT_CALIBRATION_PARAM[self.calibration]
            return
        if self.calibration == "percentile":
            check(50 < p <= 100, "QuantConfig.calibration_param", f"percentile must be in (50, 100], got {p!r}")
        elif self.calibration in ("mse", "entropy"):
            check(float(p).is_integer() and p >= 16, "QuantConfig.calibration_param", f"{self.calibration} needs an integer >= 16 (grid points / bins), got {p!r}")

    @property
    def wants_mixed(self) -> bool:
        return self.max_drop is not None or self.min_metric is not None

    @property
    def wants_qat(self) -> bool:
        return self.finetune is not None

    def is_skipped(self, name: str) -> bool:
        """True when layer ``name`` stays float because ``layers`` does not select it."""
        return not self.layers.named(name)

    def bits_for(self, name: str) -> int | None:
        """Weight bits of layer ``name`` (None = float)."""
        if self.is_skipped(name):
            return None
        return self.layer_bits.get(name, self.bits)


QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def quantizable_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(name -> layer we can fake-quantize, name -> why this weight layer stays float)."""
    ok, not_ok = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
            not_ok[name] = "used inside nn.MultiheadAttention, which reads its weight directly"
        elif isinstance(mod, QUANTIZABLE):
            ok[name] = mod
        elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvTransposeNd, nn.RNNBase)):
            not_ok[name] = f"{type(mod).__name__} has no low-bit kernel here"
        elif not isinstance(mod, QUANTIZABLE) and any(
                p.dim() >= 2 for p in mod.parameters(recurse=False)) and not isinstance(mod, nn.MultiheadAttention):
            # a layer with its own weight matrix (HF Conv1D, a user's layer calling F.linear):
            # no fake-quant wrapper for it, and the warning says so
            not_ok[name] = f"{type(mod).__name__} holds its own weight matrix; only Linear/Conv layers are quantized"
    inside_mha = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name in [n for n in ok if any(n.startswith(p + ".") for p in inside_mha)]:
        not_ok[name] = "used inside nn.MultiheadAttention, which reads its weight directly"
        del ok[name]
    return ok, not_ok


def reduction_size(layer: nn.Module) -> int:
    """Number of weights feeding one output (in_features, or in_channels/groups * kernel)."""
    return layer.weight[0].numel()


def validate_for_model(cfg: QuantConfig, model: nn.Module, task: Any = None) -> None:
    """Checks that need the model/task; call before any work (apply does)."""
    layers, _ = quantizable_layers(model)
    check(bool(layers), "QuantConfig", f"{type(model).__name__} has no Linear/Conv layer to quantize")
    for name in cfg.layer_bits:
        check(name in layers, "QuantConfig.layer_bits", f"no quantizable layer named {name!r} (have e.g. {sorted(layers)[:3]})")
    if cfg.granularity == "per_group":
        for name, layer in layers.items():
            n = reduction_size(layer)
            check(cfg.bits_for(name) is None or n % cfg.group_size == 0, "QuantConfig.group_size",
                  f"{cfg.group_size} does not divide layer {name!r} input size {n}; pick a divisor or add it to layers.exclude")
    if task is not None:
        needs_data = cfg.mode == "static" or cfg.bias_correction or cfg.smooth_alpha is not None or cfg.equalize
        check(not needs_data or task.train is not None or task.val is not None, "QuantConfig.mode",
              f"{cfg.mode!r} calibration needs data but task {task.name!r} has no train or val split; use mode='dynamic' or 'weights_only'")
        check(not (cfg.wants_qat and task.train is None), "QuantConfig.finetune", f"QAT needs task {task.name!r} to have a train split")
        check(not (cfg.wants_mixed and task.val is None and task.test is None), "QuantConfig.max_drop", "mixed precision needs a val or test split")

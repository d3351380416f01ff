"""Quantization: schemes, calibration, fake quant (PTQ simulation, QAT), mixed precision, and
real low-bit backends (torchao in PyTorch, ONNX Runtime after export)."""

from ..core.stage import StageResult
from .config import BACKENDS, QuantConfig, register_backend, validate_for_model
from .convert import convert, saved_bytes
from .fake import (
    FakeQuantConv,
    FakeQuantLayer,
    FakeQuantLinear,
    dequantize,
    fake_quantize,
    qparams,
    quantize_tensor,
)
from .mixed import LayerChoice, search_plan
from .observers import observe
from .ort_backend import OrtModel, OrtQuantConfig, ort_fp32, ort_quantize
from .ptq import LayerQuant, QuantizedWeights, apply, export_weights, save_quantized, simulate
from .qat import finetune
from .smooth import equalize, fold_batchnorm, smooth_quant
from .torchao_backend import TorchaoConfig, torchao_quantize


def quantize(model, config: QuantConfig, task) -> StageResult:
    """Quantize a copy of model as config says; returns StageResult(model, info, save)."""
    from ..core.errors import check
    from ..core.stage import apply_stage

    check(isinstance(config, QuantConfig), "quantize", f"config must be a QuantConfig, got {type(config).__name__}")
    return apply_stage(model, config, task)


__all__ = [
    "BACKENDS",
    "FakeQuantConv",
    "FakeQuantLayer",
    "FakeQuantLinear",
    "LayerChoice",
    "LayerQuant",
    "OrtModel",
    "OrtQuantConfig",
    "QuantConfig",
    "QuantizedWeights",
    "TorchaoConfig",
    "apply",
    "convert",
    "dequantize",
    "equalize",
    "export_weights",
    "fake_quantize",
    "finetune",
    "fold_batchnorm",
    "observe",
    "ort_fp32",
    "ort_quantize",
    "qparams",
    "quantize",
    "quantize_tensor",
    "register_backend",
    "save_quantized",
    "saved_bytes",
    "search_plan",
    "simulate",
    "smooth_quant",
    "torchao_quantize",
    "validate_for_model",
]

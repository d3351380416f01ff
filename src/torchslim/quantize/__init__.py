"""Quantization: schemes, calibration, fake quant (PTQ simulation, QAT), mixed precision, and
real low-bit backends (torchao in PyTorch, ONNX Runtime after export)."""

from .config import BACKENDS, QuantConfig, register_backend, validate_for_model
from .fake import FakeQuantConv, FakeQuantLayer, FakeQuantLinear, dequantize, fake_quantize, qparams, quantize_tensor
from .mixed import LayerChoice, search_plan
from .observers import observe
from .ptq import LayerQuant, QuantizedWeights, apply, export_weights, save_quantized, simulate
from .qat import finetune
from .smooth import equalize, fold_batchnorm, smooth_quant

from ..stage import StageResult, make_callable_module


def quantize(model, config: QuantConfig, task) -> StageResult:
    """Quantize model as config says; returns StageResult(model, info, save)."""
    return apply(model, config, task)


make_callable_module(__name__, quantize)

__all__ = ["quantize", 
    "BACKENDS", "FakeQuantConv", "FakeQuantLayer", "FakeQuantLinear", "LayerChoice", "LayerQuant",
    "QuantConfig", "QuantizedWeights", "apply", "dequantize", "equalize", "export_weights", "fake_quantize",
    "finetune", "fold_batchnorm", "observe", "qparams", "quantize_tensor", "register_backend", "save_quantized",
    "search_plan", "simulate", "smooth_quant", "validate_for_model",
]

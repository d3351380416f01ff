"""Real-kernel backends, registered with the quantize stage (``QuantConfig.backend``).

The backends themselves are named in the one registry, ``config.BACKENDS`` (imported on first
use); this module only gathers their public functions in one import.
"""

from __future__ import annotations

from .convert import auto, convert, save, saved_bytes, to_onnxruntime, to_torchao
from .ort_backend import OrtModel, OrtQuantConfig, ort_fp32, ort_quantize
from .torchao_backend import TorchaoConfig, torchao_quantize

__all__ = [
    "OrtModel", "OrtQuantConfig", "TorchaoConfig", "auto", "convert", "ort_fp32", "ort_quantize",
    "save", "saved_bytes", "to_onnxruntime", "to_torchao", "torchao_quantize",
]

"""Real-kernel backends, registered with the quantize stage (``QuantConfig.backend``).

Importing this module registers "onnxruntime", "torchao" and "auto" in ``config.BACKENDS``;
``ptq.apply`` imports it when a real backend is asked for. Each entry is
``convert(simulated_model, plan, cfg, task) -> StageResult`` (see convert.py).
"""

from __future__ import annotations

from .config import register_backend
from .convert import auto, convert, save, saved_bytes, to_onnxruntime, to_torchao
from .ort_backend import OrtModel, OrtQuantConfig, ort_fp32, ort_quantize
from .torchao_backend import TorchaoConfig, torchao_quantize

register_backend("onnxruntime")(to_onnxruntime)
register_backend("torchao")(to_torchao)
register_backend("auto")(auto)

__all__ = [
    "OrtModel", "OrtQuantConfig", "TorchaoConfig", "auto", "convert", "ort_fp32", "ort_quantize",
    "save", "saved_bytes", "to_onnxruntime", "to_torchao", "torchao_quantize",
]

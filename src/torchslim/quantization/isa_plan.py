"""Which int8 path the real backends take on *this* CPU, and why (``isa.cpu_isa()``).

Measured on AVX2 without VNNI (AMD EPYC, ONNX Runtime 1.32, torchao 0.18; the checks are in
tests/test_quant_isa.py and tests/test_quant_backends.py):

- ONNX Runtime's u8s8 int8 GEMMs (MatMulInteger / DynamicQuantizeMatMul from quantize_dynamic,
  QGemm / QLinearMatMul from static QDQ, QAttention) use ``vpmaddubsw``: each pair of u8*s8
  products is added into a *saturating* int16. With full-range 8-bit weights (|q| <= 127) a
  pair reaches 2*255*127 = 64770 > 32767, so sums are wrong: a MatMulInteger on random operands
  gets 99% of its outputs wrong and equals the saturating-pair model bit for bit; the digits MLP
  is off by 12% of its logit range. ``reduce_range`` (ORT's 7-bit weights, integers in
  [-64, 64], scale max|w| / 64) keeps every pair <= 2*255*64 = 32640: exact and no slower, so
  it is the default here, and the simulation models it (``sim_reduce_range``). U8U8 is exact
  too (another MLAS kernel) but needs asymmetric weights. With VNNI (``vpdpbusd``, int32
  accumulation) full 8-bit weights are exact and keep their extra bit: reduce_range stays off.
- MatMulNBits 8-bit blocks: accuracy_level 4 (int8 compute) is exactly "activations quantized
  to int8 per block of block_size, scale max|x| / 127, times the int8 block weights" (3e-7),
  does not saturate here (all-maximum operands come out exact) and ran 1.1-1.3x faster than
  float compute, so it stays the default; but 8-bit MatMulNBits at either level ran 0.55-0.85x
  of a float MatMul at MiniLM's FFN shapes (1536x384, 32x40 tokens, 2 threads): an 8-bit block
  layer costs more time than keeping it float. That is noted in the info, not changed.
- torchao Int8DynamicActivationInt8Weight in eager ran 0.05x (that Linear) and 0.29x (digits
  MLP) of fp32 eager: ``auto`` does not build it here.

An explicit choice (``reduce_range=False``) is honoured, with one warning naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from ..core import isa

REDUCED_WEIGHT_QMAX = 64  # ORT reduce_range: int8 weights in [-64, 64]

SATURATION_WHY = ("on this CPU ({isa}) ONNX Runtime's u8s8 int8 kernels add pairs of u8*s8 products into a "
                  "saturating int16 (vpmaddubsw), so full-range 8-bit weights give wrong sums (12% of the logit "
                  "range on the digits MLP); reduce_range=True (7-bit weights, [-64, 64]) is exact here")
EXACT_WHY = "{isa}: int8 products accumulate in int32 without saturation, so full 8-bit weights are exact"
NBITS8_SLOW = ("8-bit MatMulNBits ran 0.55-0.85x of a float MatMul at MiniLM FFN shapes on AVX2 without VNNI "
               "(either accuracy level): a block layer here costs more time than keeping it float")
TORCHAO_INT8_SLOW = ("torchao int8_dynamic in eager ran 0.05x (Linear 1536->384, 32x40 tokens) and 0.29x "
                     "(digits MLP) of fp32 eager on AVX2 without VNNI")


def default_reduce_range() -> bool:
    """ORT reduce_range when the user leaves it None: on where u8s8 products saturate."""
    return isa.int8_saturates()


def resolve_ort(cfg: Any) -> tuple[Any, dict[str, Any]]:
    """(cfg with every ISA-dependent None field decided, the record of what and why).

    Warns once when an explicit choice is known to lose accuracy on this CPU."""
    facts = isa.cpu_isa()
    sat = isa.int8_saturates()
    plan: dict[str, Any] = {"isa": facts["summary"], "cpu": isa.describe(), "int8_saturates": sat}
    why = (SATURATION_WHY if sat else EXACT_WHY).format(isa=facts["summary"])
    if cfg.reduce_range is None:
        rr = default_reduce_range()
        plan["reduce_range"] = {"value": rr, "chosen_by": "isa", "why": why}
    else:
        rr = bool(cfg.reduce_range)
        plan["reduce_range"] = {"value": rr, "chosen_by": "user"}
        if sat and not rr:
            msg = f"OrtQuantConfig.reduce_range=False loses accuracy: {why}"
            plan["reduce_range"]["warning"] = msg
            warnings.warn(msg, stacklevel=3)
    plan["block_int8_compute"] = cfg.block_int8_compute if cfg.block_bits else None
    if sat and cfg.block_bits == 8:
        plan["notes"] = [NBITS8_SLOW]
    return dataclasses.replace(cfg, reduce_range=rr), plan


def sim_reduce_range(cfg: Any, layer: str) -> bool:
    """Whether the simulation gives ``layer`` ORT's reduce_range weights ([-64, 64], scale
    max|w| / 64), i.e. what ONNX Runtime will compute for it: the backend is onnxruntime (or
    auto, which builds it), reduce_range is on (``ort_options`` or the ISA default), weights
    are symmetric per tensor / channel (MatMulNBits blocks ignore reduce_range) and the layer
    is not one of ``ort_options["block_layers"]``."""
    if cfg.backend not in ("onnxruntime", "auto") or cfg.granularity == "per_group" or cfg.weight_scheme != "symmetric":
        return False
    opts = cfg.ort_options or {}
    rr = opts.get("reduce_range")
    if not (default_reduce_range() if rr is None else rr):
        return False
    return not any(fnmatch.fnmatchcase(layer, p) for p in opts.get("block_layers", ()))


def torchao_known_slow(scheme: str, compiled: bool) -> str | None:
    """Why a torchao scheme is known slow on this CPU, or None."""
    if scheme == "int8_dynamic" and not compiled and isa.int8_saturates():
        return TORCHAO_INT8_SLOW
    return None


# ---------------------------------------------------------------------------- ORT's logging
class _FromPackage(logging.Filter):
    def __init__(self, root: str, level: int):
        super().__init__()
        self.root, self.level = root, level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not record.pathname.startswith(self.root)


@contextlib.contextmanager
def quiet_ort_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Hide ONNX Runtime's quantization messages below ``level`` (e.g. "consider pre-processing")
    and nothing else. ORT's quantizers log through the *root* logger (``logging.warning(...)``),
    so a filter on the root logger drops only records whose source file is in the onnxruntime
    package; ORT's named loggers ("onnxruntime.*") get ``level``. Both are undone afterwards, as
    is the handler ``logging.warning`` installs on an unconfigured root logger."""
    import onnxruntime

    root, named = logging.getLogger(), logging.getLogger("onnxruntime")
    handlers, old_level = list(root.handlers), named.level
    flt = _FromPackage(os.path.dirname(onnxruntime.__file__), level)
    root.addFilter(flt)
    named.setLevel(level)
    try:
        yield
    finally:
        root.removeFilter(flt)
        named.setLevel(old_level)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)

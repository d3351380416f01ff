"""Import guards for third-party packages that are installed but half-broken here.

torchvision from PyPI is built against the CUDA build of torch: beside the CPU build of the
same version its C ops (``_C.so``, linked to libc10_cuda) cannot load, and ``import
torchvision`` fails with "operator torchvision::nms does not exist" — and with it every
``import transformers`` that finds torchvision installed (transformers imports it for image
processors). The model definitions are pure Python; only the detection ops live in C. So when,
and only when, that exact failure happens, ``import_torchvision`` defines the two op schemas
torchvision's import registers fake kernels for (``nms``, ``qnms``: detection ops no classifier
calls; calling them raises "no kernel"), then imports it again. A torchvision whose C ops load
is imported untouched.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

_LIB: list = []  # keeps the schema definitions alive for the process


def import_torchvision() -> bool:
    """Import torchvision (working around the CPU/CUDA wheel mismatch above); False if absent."""
    if "torchvision" in sys.modules:
        return True
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision
        return True
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if not _LIB:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.append(lib)
    import torchvision  # noqa: F401

    return True

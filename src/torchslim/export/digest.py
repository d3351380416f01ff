"""A content checksum for torchslim's own tensor files (issue 12, point 5).

``tensor_digest`` is the SHA-256 of every tensor's name, dtype, shape and bytes, in sorted
name order; files written by torchslim carry it in their metadata and loading recomputes it,
so a flipped byte in tensor data is a one-line error instead of silently wrong weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype!s}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

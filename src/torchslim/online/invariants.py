"""What "still compressed" means, as a fingerprint to compare before and after online learning.

- masks: per pruned tensor, the number kept, a digest of the mask and the zeros in the weight;
- shared: per shared layer, the codebook size, a digest of the indices, and whether every
  weight value is one of the codebook's values (it is, by construction: weight = codebook[idx]);
- fake-quant: per layer, the weight bits, the scale layout, and whether every row of the
  fake-quantized weight has at most 2**bits distinct levels;
- shapes: every state-dict tensor's shape and dtype (structured pruning's smaller shapes);
- bytes: the safetensors file of the plain state dict, the sparse file when there are masks,
  the entropy-coded archive when weights are shared; for the archive the invariant is its
  layout (encodings, value dtypes, codebook sizes, index bits, section symbol counts) and the
  bytes of its index and position sections: its value sections (centroids, biases) are
  entropy-coded, so new values move the total by a few bytes, reported by coded_bytes_delta.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _file_bytes(save, model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m"
        save(model, path)
        return path.stat().st_size


def _masks(model: nn.Module) -> dict[str, Any]:
    from ..pruning.masks import masks_of, param_of

    out = {}
    for name, m in masks_of(model).items():
        p = param_of(model, name).detach()
        out[name] = {"kept": int(m.sum()), "mask": _digest(m), "zeros_where_pruned": bool((p[~m] == 0).all()),
                     "nonzeros": int(torch.count_nonzero(p))}
    return out


def _shared(model: nn.Module) -> dict[str, Any]:
    from ..sharing import shared_layers

    out = {}
    for name, sw in shared_layers(model).items():
        w = model.get_submodule(name).weight.detach()
        allowed = torch.cat([sw.codebook.detach().flatten(), torch.zeros(1, dtype=w.dtype)])
        out[name] = {"k": int(sw.codebook.numel()), "indices": _digest(sw.indices), "mask": _digest(sw.mask),
                     "values_in_codebook": bool(torch.isin(w.flatten(), allowed).all())}
    return out


def _fake_quant(model: nn.Module) -> dict[str, Any]:
    from ..quantization.fake import FakeQuantLayer, rows_view

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLayer):
            with torch.no_grad():
                rows = rows_view(m.quantized_weight(), m.wq.granularity, m.wq.group_size)
            levels = max(int(torch.unique(r).numel()) for r in rows)  # value-dependent: not compared
            out[name] = {"bits": m.wq.bits, "granularity": m.wq.granularity, "scale_shape": list(m.wq.scale.shape),
                         "within_bits": levels <= 2 ** m.wq.bits}
    return out


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """The compression facts of model (see module doc); equal dicts = compression unchanged."""
    from ..export.weights import plain_state_dict, save_weights

    masks, shared, fq = _masks(model), _shared(model), _fake_quant(model)
    out: dict[str, Any] = {
        "masks": masks, "shared": shared, "fake_quant": fq,
        "shapes": {k: [list(v.shape), str(v.dtype)] for k, v in plain_state_dict(model).items()},
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": {"safetensors": _file_bytes(save_weights, model)},
    }
    if masks:
        from ..export.sparse import save_sparse

        out["bytes"]["sparse"] = _file_bytes(save_sparse, model)
    if shared:
        out["bytes"]["archive"], out["archive_layout"] = _archive(model)
    return out


VALUE_ROLES = ("v", "c")  # archive sections of float values (entropy-coded: their size follows the values)


def _archive(model: nn.Module) -> tuple[int, dict[str, Any]]:
    """The archive's byte count and its layout: per tensor the encoding, value dtype and every
    section's role, bit width and symbol count, plus the bytes of the sections that are not
    float values (codebook indices, positions): those depend on the indices and the mask only.
    The value sections (codebook centroids, biases) are entropy-coded by whichever coder is
    smallest for them, so new centroid and bias values move the total by a few bytes (B11)."""
    from ..export.archive import inspect_archive, save_archive

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.tsla"
        save_archive(model, path)
        info = inspect_archive(path)
    layout = {t["name"]: {"encoding": t["encoding"], "value_dtype": t["value_dtype"], "codebook": t["codebook"],
                          "index_bits": t["index_bits"],
                          "sections": [[s["role"], s["width"], s["count"]] for s in t["sections"]],
                          "index_and_position_bytes": sum(s["bytes"] for s in t["sections"] if s["role"] not in VALUE_ROLES)}
              for t in info["tensors"]}
    return info["bytes"], layout


STRUCTURAL = ("masks", "shared", "fake_quant", "shapes", "params", "archive_layout")
FIXED_SIZE = ("safetensors", "sparse")  # formats whose size depends on shapes and non-zeros only
CODED = ("archive",)  # entropy-coded: its size follows how well the values compress


def _counts(masks: dict[str, Any]) -> dict[str, Any]:
    return {n: {k: v for k, v in m.items() if k != "mask"} for n, m in masks.items()}


def differences(before: dict[str, Any], after: dict[str, Any], masks_moved: bool = False) -> list[str]:
    """What changed between two fingerprints: structural facts and the bytes of the fixed-size
    formats (the entropy-coded archive's byte count is compared by ``coded_bytes_delta``; its
    layout, index and position bytes are structural). masks_moved: drop-and-grow moved where the
    non-zeros are on purpose; the masks then compare by their counts (kept and non-zeros per
    tensor, zeros exactly where pruned), not by position."""
    diffs = []
    for key in STRUCTURAL:
        a, b = before.get(key), after.get(key)
        if key == "masks" and masks_moved:
            a, b = _counts(a or {}), _counts(b or {})
        if a != b:
            diffs.append(f"{key} changed")
    for kind in FIXED_SIZE:
        n, m = before.get("bytes", {}).get(kind), after.get("bytes", {}).get(kind)
        if m != n:
            diffs.append(f"{kind} bytes {n} -> {m}")
    return diffs


def coded_bytes_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Change in bytes of each entropy-coded file (e.g. {"archive": +6})."""
    return {k: after["bytes"][k] - before["bytes"][k] for k in CODED
            if k in before.get("bytes", {}) and k in after.get("bytes", {})}

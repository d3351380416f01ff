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


def leaves(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Plain tensors behind ``t``: a tensor subclass (torchao's int8 tensors) is flattened into
    its inner tensors (``__tensor_flatten__``), whose bytes are what the file really stores."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or not hasattr(t, "__tensor_flatten__"):
        return [(name, t)]
    inner, ctx = t.__tensor_flatten__()
    out = [(f"{name}|ctx", torch.frombuffer(bytearray(repr(ctx).encode()), dtype=torch.uint8))]
    for key in inner:
        out += leaves(f"{name}.{key}", getattr(t, key))
    return out


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """``tensor_digest`` over a state dict that may hold tensor subclasses."""
    return tensor_digest(dict(leaf for k, v in state.items() for leaf in leaves(k, v)))


# torch.save files have no metadata field (and their zip CRCs are not checked on load), so the
# checksum travels as one reserved entry: a uint8 tensor holding the hex digest.
TORCH_KEY = "__torchslim__.sha256"
SAFETENSORS_KEY = "torchslim.sha256"


def stamp_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state plus its checksum entry (for torch.save)."""
    digest = state_digest(state)
    return {**state, TORCH_KEY: torch.frombuffer(bytearray(digest.encode()), dtype=torch.uint8)}


def check_state(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Pop and verify the checksum entry of a torch file (files without one pass: other tools')."""
    from ..core.errors import WeightsError

    stored = state.pop(TORCH_KEY, None)
    if stored is None:
        return state
    if stored.dtype != torch.uint8 or stored.ndim != 1 or bytes(stored.tolist()).decode(errors="replace") != state_digest(state):
        raise WeightsError(f"weights file {path!r} is damaged: its tensor data does not match its checksum; re-export it")
    return state


def onnx_digest(model) -> str:
    """SHA-256 of an ONNX model's graph (nodes, initializers, inputs/outputs) and opsets."""
    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for op in model.opset_import:
        h.update(op.SerializeToString(deterministic=True))
    return h.hexdigest()


ONNX_KEY = "torchslim.sha256"
PRODUCER_KEY = "torchslim.exporter"
PRODUCER = "torchslim"


def stamp_onnx_bytes(data: bytes) -> bytes:
    """The ONNX model in ``data`` with its checksum in ``metadata_props`` (replacing an old one)."""
    import onnx

    return stamp_onnx_model(onnx.load_from_string(data)).SerializeToString(deterministic=True)


def stamp_onnx_model(model):
    """Put the checksum (and torchslim as producer) into an ONNX ModelProto, in place; returns it."""
    for prop in [p for p in model.metadata_props if p.key in (ONNX_KEY, PRODUCER_KEY)]:
        model.metadata_props.remove(prop)
    # the checksum is serialized last (metadata_props is field 14, after the graph): a file cut
    # just before it would look like one without a checksum. producer_name (field 2, first)
    # says torchslim wrote it, so a missing checksum is damage; the exporter's name is kept.
    if model.producer_name and model.producer_name != PRODUCER:
        model.metadata_props.add(key=PRODUCER_KEY, value=f"{model.producer_name} {model.producer_version}".strip())
    model.producer_name = PRODUCER
    model.metadata_props.add(key=ONNX_KEY, value=onnx_digest(model))
    return model


def onnx_damage(model) -> str | None:
    """Why an ONNX model's stored checksum does not hold (None when it holds or there is none)."""
    stored = next((p.value for p in model.metadata_props if p.key == ONNX_KEY), None)
    if stored is None and model.producer_name == PRODUCER:
        return "written by torchslim but its checksum is missing (the file is truncated or damaged); re-export it"
    if stored is None or stored == onnx_digest(model):
        return None
    return "its graph does not match its checksum (the file is damaged); re-export it"

"""``torchslim inspect FILE``: a table of what a model file holds, without running it."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import TorchslimError


def sniff(p: Path) -> str:
    """The kind of a model file from its first bytes (the suffix only breaks ties): "archive",
    "safetensors", "torch" (a torch.save zip) or "onnx"; the runner's artifacts/*.bin are any
    of these, so the content decides."""
    with open(p, "rb") as fh:
        head = fh.read(9)
    if not head:
        raise TorchslimError(f"inspect: {str(p)!r} is empty (0 bytes)")
    if head[:4] == b"TSLA":
        return "archive"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < p.stat().st_size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if p.suffix == ".onnx" or head[:1] == b"\x08":  # an ONNX ModelProto starts with ir_version (field 1)
        return "onnx"
    raise TorchslimError(f"inspect: unknown file type of {p.name!r}; expected a torchslim archive, safetensors, "
                         "a torch state dict or ONNX")


def inspect_file(path: str):
    from rich.table import Table

    p = Path(path)
    if not p.is_file():
        raise TorchslimError(f"inspect: file {path!r} does not exist")
    kind = sniff(p)
    table = Table(title=f"{p.name} ({p.stat().st_size:,} bytes, {kind})")
    if kind == "archive":
        return _archive(p, table)
    if kind == "onnx":
        return _onnx(p, table)
    return _state_dict(p, table, kind)


def _archive(p: Path, table):
    from ..export.archive import inspect_archive

    rows = inspect_archive(str(p)).get("tensors", [])
    for col in (rows[0] if rows else {"tensor": ""}):
        table.add_column(str(col))
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    return table


def _state_dict(p: Path, table, kind: str):
    from ..export.weights import read_state_dict

    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise TorchslimError(f"inspect: {str(p)!r} is a damaged safetensors file ({str(exc)[:120]})") from None
        if "torchslim.sparse" in meta or meta.get("format", "").startswith("torchslim.sparse"):
            from ..export.sparse import load_sparse

            state = load_sparse(p)  # verifies the checksum
            table.title = f"{table.title}, torchslim sparse"
        else:
            state = _read_as(p, ".safetensors", read_state_dict)
    else:
        state = _read_as(p, ".pt", read_state_dict)
    for col in ("tensor", "shape", "dtype", "non-zeros", "bytes"):
        table.add_column(col)
    from ..export.digest import leaves

    for key, value in state.items():  # a tensor subclass (torchao int8) shows its stored parts
        for k, v in leaves(key, value):
            if k.endswith("|ctx"):
                continue
            table.add_row(k, str(tuple(v.shape)), str(v.dtype).replace("torch.", ""),
                          f"{int((v != 0).sum()):,}", f"{v.numel() * v.element_size():,}")
    return table


def _read_as(p: Path, suffix: str, read):
    """read_state_dict picks its reader by suffix; an artifact named .bin is read by content."""
    if p.suffix == suffix:
        return read(p)
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        link = Path(d) / f"file{suffix}"
        os.symlink(p.resolve(), link)
        return read(link)


def _onnx(p: Path, table):
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - protobuf/checker errors: a damaged file, one line
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise TorchslimError(f"inspect: {str(p)!r} is not a valid ONNX model ({first})") from None
    if not model.graph.node:
        raise TorchslimError(f"inspect: {str(p)!r} is not a valid ONNX model (no graph nodes)")
    from ..export.digest import onnx_damage

    damage = onnx_damage(model)
    if damage:
        raise TorchslimError(f"inspect: {str(p)!r}: {damage}")
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    for col in ("initializer / op", "shape or count", "dtype"):
        table.add_column(col)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        table.add_row(init.name, str(arr.shape), str(arr.dtype))
    for op, n in sorted(ops.items()):
        table.add_row(f"op {op}", str(n), "")
    return table

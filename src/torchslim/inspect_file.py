"""``torchslim inspect FILE``: a table of what a model file holds, without running it."""

from __future__ import annotations

from pathlib import Path

from .errors import TorchslimError


def inspect_file(path: str):
    from rich.table import Table

    p = Path(path)
    if not p.is_file():
        raise TorchslimError(f"inspect: file {path!r} does not exist")
    table = Table(title=f"{p.name} ({p.stat().st_size:,} bytes)")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head == b"TSLA" or p.suffix == ".tsla":
        return _archive(p, table)
    if p.suffix == ".onnx":
        return _onnx(p, table)
    if p.suffix in (".safetensors", ".pt", ".pth"):
        return _state_dict(p, table)
    raise TorchslimError(f"inspect: unknown file type {p.suffix!r}; expected .tsla, .safetensors, .pt or .onnx")


def _archive(p: Path, table):
    from .export.archive import inspect_archive

    rows = inspect_archive(str(p)).get("tensors", [])
    for col in (rows[0] if rows else {"tensor": ""}):
        table.add_column(str(col))
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    return table


def _state_dict(p: Path, table):
    from .export.weights import read_state_dict

    state = read_state_dict(p)
    for col in ("tensor", "shape", "dtype", "non-zeros", "bytes"):
        table.add_column(col)
    for k, v in state.items():
        table.add_row(k, str(tuple(v.shape)), str(v.dtype).replace("torch.", ""),
                      f"{int((v != 0).sum()):,}", f"{v.numel() * v.element_size():,}")
    return table


def _onnx(p: Path, table):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(p))
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

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
    head = p.read_bytes()[:8]
    if p.suffix == ".onnx":
        return _onnx(p, table)
    if p.suffix == ".safetensors" or p.suffix in (".pt", ".pth"):
        return _state_dict(p, table)
    try:
        from .export.archive import inspect_archive
    except ImportError:
        inspect_archive = None
    if inspect_archive is not None:
        info = inspect_archive(str(p))
        rows = info.get("tensors", info) if isinstance(info, dict) else info
        if isinstance(rows, list) and rows:
            for col in rows[0]:
                table.add_column(str(col))
            for r in rows:
                table.add_row(*[str(v) for v in r.values()])
            return table
    raise TorchslimError(f"inspect: unknown file type {p.suffix or head!r}; expected .tsa, .safetensors, .pt or .onnx")


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

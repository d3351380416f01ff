"""Store the constant inputs of a computed weight in their narrowest exact type.

A parametrized weight (weight sharing's ``codebook[indices] * mask``) exports as
``Gather(codebook, indices) * mask``, and torch's exporter folds the index widening and the
mask's bool-to-float into the initializers: the file held int64 indices and a float32 mask,
12 bytes per weight, about 3x the fp32 file (measured on LeNet-300-100 at 4 bits: 607 kB against
204 kB; 105 kB after this pass). This pass stores such indices as uint8 (when every value is
0..255) and such masks as bool (when every value is 0 or 1), each followed by a Cast back to the
type the graph used: the same values exactly, 2 bytes per weight, and ONNX Runtime folds the
casts when it loads the session, so the graph runs as before. Applied by ``export_onnx`` when the
model has a parametrized tensor. Written by hand because no ONNX tool narrows storage types
(onnx's optimizer and onnxslim fold constants the other way: into the wide type).

Not done: the mask could vanish into the codebook (a zero centroid) for 1 byte per weight, and
indices of <= 4 bits could be packed two per byte; sharing's own archive (``export/archive.py``)
stores both that way.
"""

from __future__ import annotations

import numpy as np

#: an initializer smaller than this stays as it is (a Cast node, ~60 bytes, costs more than it saves;
#: narrowing saves 7 bytes per int64 index and 3 per float mask value)
MIN_ELEMENTS = 64


def narrow_initializers(model) -> list[str]:
    """Narrow, in place, the int64 Gather indices and float 0/1 Mul operands of an ONNX
    ModelProto that are initializers; return their names."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    gather_indices = {n.input[1] for n in graph.node if n.op_type == "Gather" and len(n.input) > 1}
    mul_inputs = {i for n in graph.node if n.op_type == "Mul" for i in n.input}
    fed = {i.name for i in graph.input}  # an initializer that is also a graph input can be overridden
    casts, done = [], []
    for k, t in enumerate(graph.initializer):
        if t.name in fed or np.prod(t.dims) < MIN_ELEMENTS:
            continue
        if t.name in gather_indices and t.data_type == TensorProto.INT64:
            arr = numpy_helper.to_array(t)
            if arr.min() < 0 or arr.max() > 255:
                continue
            narrow, back = arr.astype(np.uint8), TensorProto.INT64
        elif t.name in mul_inputs and t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            if not np.isin(arr, (0.0, 1.0)).all() or np.signbit(arr).any():  # -0.0 would come back +0.0
                continue
            narrow, back = arr.astype(bool), TensorProto.FLOAT
        else:
            continue
        name = t.name  # t is the initializer itself: read its name before it is replaced
        stored = f"{name}__narrow"
        graph.initializer[k].CopyFrom(numpy_helper.from_array(narrow, stored))
        casts.append(helper.make_node("Cast", [stored], [name], to=back, name=f"torchslim_narrow_{k}"))
        done.append(name)
    for node in reversed(casts):  # before every consumer (nodes are kept in topological order)
        graph.node.insert(0, node)
    return done

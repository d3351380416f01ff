"""ONNX graph helpers for the ONNX Runtime backend: fusion, layer <-> node matching, smoothing.

- ``optimize_graph`` fuses transformer blocks with onnxruntime.transformers (Attention,
  SkipLayerNorm, BiasGelu), which also makes the fp32 graph faster.
- ``layer_nodes`` finds which ONNX nodes hold a torch layer's weight (by value, so it works
  whatever the exporter names nodes).
- ``smooth_graph``: SmoothQuant (Xiao et al. 2023) in the graph. quantize_dynamic quantizes a
  MatMul's input with one scale per tensor, so a few outlier input channels (e.g. the LayerNorm
  output feeding BERT's FFN) waste the int8 range. x W = (x / s)(s W): the weight rows are
  scaled by s and a per-channel ``Mul(x, 1/s)`` is inserted before the node. In post-LN BERT
  the LayerNorm output is also the residual, so 1/s cannot be folded into the LayerNorm; the Mul
  is an elementwise op on the MatMul's input (negligible next to the product, measured in B2).
  Hand-written because ORT's quantizers offer SmoothQuant only for static QDQ graphs.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Attention")
SMOOTHABLE_OPS = ("MatMul", "Attention")  # weight rows are the input channels


def transformer_dims(model: nn.Module) -> tuple[int, int] | None:
    """(num_heads, hidden_size) of a Hugging Face encoder inside model, else None."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_attention_heads") and hasattr(cfg, "hidden_size"):
            return int(cfg.num_attention_heads), int(cfg.hidden_size)
    return None


def eager_attention(model: nn.Module) -> None:
    """Switch HF attention to the 'eager' implementation (in place): its exported graph is the
    pattern ORT's fusion recognises; SDPA exports to a graph ORT cannot fuse."""
    for m in model.modules():
        if hasattr(m, "set_attn_implementation") and getattr(getattr(m, "config", None), "_attn_implementation", "eager") != "eager":
            m.set_attn_implementation("eager")


def optimize_graph(path: Path, dims: tuple[int, int] | None, out: Path) -> dict[str, int]:
    """Fuse transformer blocks with onnxruntime.transformers (no-op copy without dims)."""
    if dims is None:
        out.write_bytes(path.read_bytes())
        return {}
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimizer.optimize_model(str(path), model_type="bert", num_heads=dims[0], hidden_size=dims[1])
    opt.save_model_to_file(str(out))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def _initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _fingerprint(w: np.ndarray) -> tuple:
    """Shape plus the exact first and last values (exporters copy weights bit for bit)."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    return (w.shape, flat[:16].tobytes(), flat[-16:].tobytes())


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> float Linear/Conv; a FakeQuantLayer counts under its own name (not '.layer')."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    out: dict[str, nn.Module] = {}
    inner: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "layer", None), kinds) and hasattr(mod, "wq"):
            out[name] = mod.layer
            inner.add(id(mod.layer))
        elif isinstance(mod, kinds) and id(mod) not in inner:
            out[name] = mod
    return out


def layer_nodes(onnx_path: str | os.PathLike, model: nn.Module) -> dict[str, list[str]]:
    """torch layer name -> ONNX node names that hold its weight (matched by values, so it works
    whatever the exporter names nodes; fused Attention holds q, k and v together)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    inits = _initializers(graph)
    by_print: dict[tuple, list[str]] = {}
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        for name in node.input[1:2]:
            w = inits.get(name)
            if w is None or w.ndim < 2:
                continue
            cands = [w, w.T] if node.op_type in ("MatMul", "Gemm") else [w]
            if node.op_type == "Attention":
                cands = [c.T for c in np.split(w, 3, axis=1)]
            for c in cands:
                by_print.setdefault(_fingerprint(np.ascontiguousarray(c)), []).append(node.name)
    found: dict[str, list[str]] = {}
    for name, layer in weight_layers(model).items():
        nodes = by_print.get(_fingerprint(layer.weight.detach().cpu().numpy()))
        if nodes:
            found[name] = sorted(set(nodes))
    return found


def select_nodes(patterns: Iterable[str], mapping: dict[str, list[str]], graph) -> list[str]:
    """ONNX node names whose torch layer (or, without a mapping, node name) matches a pattern."""
    pats = tuple(patterns)
    hit = {n for layer, nodes in mapping.items() if any(fnmatch.fnmatchcase(layer, p) for p in pats) for n in nodes}
    hit |= {node.name for node in graph.node if any(fnmatch.fnmatchcase(node.name, p) for p in pats)}
    return sorted(hit)


def act_overrides(model: nn.Module, mapping: dict[str, list[str]], graph) -> dict[str, list[dict]]:
    """ORT TensorQuantOverrides that give each quantized layer's input the simulation's static
    (scale, zero point), so ORT and the fake-quant model round activations identically."""
    fq = {n: m for n, m in model.named_modules() if hasattr(m, "aq") and hasattr(m, "wq")}
    inputs = {node.name: node.input[0] for node in graph.node if node.input}
    # a node claimed by several layers holds a weight they share (a tie): which layer's input
    # it sees is not known from values alone, so ORT calibrates that input itself
    claims: dict[str, int] = {}
    for nodes in mapping.values():
        for node in set(nodes):
            claims[node] = claims.get(node, 0) + 1
    out: dict[str, list[dict]] = {}
    for name, nodes in mapping.items():
        nodes = [n for n in nodes if claims[n] == 1]
        aq = getattr(fq.get(name), "aq", None)
        if aq is None or aq.dynamic or aq.bits != 8 or aq.symmetric or not getattr(fq[name], "enabled", True):
            continue
        for node in nodes:
            if node in inputs:
                out[inputs[node]] = [{"scale": np.array(float(aq.scale), dtype=np.float32),
                                      "zero_point": np.array(int(aq.zero_point), dtype=np.uint8)}]
    return out


# ---------------------------------------------------------------------------- SmoothQuant
def _smoothable(graph, nodes: Iterable[str]) -> list[Any]:
    inits = {t.name for t in graph.initializer}
    wanted = set(nodes)
    return [n for n in graph.node if n.name in wanted and n.op_type in SMOOTHABLE_OPS and n.input[1] in inits]


def activation_absmax(onnx_path: Path, nodes: Iterable[str], feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each listed node's input over feeds (real tokens only when the
    graph has an attention_mask: padding is not what the ranges should fit)."""
    import onnx
    from onnx import helper

    from ..export.onnx import ort_session

    model = onnx.load(str(onnx_path))
    names = sorted({n.input[0] for n in _smoothable(model.graph, nodes)})
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort_session(model.SerializeToString())
    wanted = {i.name for i in sess.get_inputs()}
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        feed = {k: v for k, v in feed.items() if k in wanted}
        mask = feed.get("attention_mask")
        for name, a in zip(names, sess.run(names, feed)):
            a = a.reshape(-1, a.shape[-1])
            if mask is not None and a.shape[0] == mask.size:
                a = a[mask.reshape(-1).astype(bool)]
            v = np.abs(a).max(0)
            amax[name] = np.maximum(amax[name], v) if name in amax else v
    return amax


def smooth_graph(src: Path, out: Path, amax: dict[str, np.ndarray], alpha: float, nodes: Iterable[str]) -> dict[str, float]:
    """Write src with SmoothQuant applied to ``nodes`` (s = amax^alpha / wmax^(1-alpha) per input
    channel); returns node -> largest s. The float graph computes the same function."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = {n.name for n in _smoothable(graph, nodes) if n.input[0] in amax}
    rebuilt, scales = [], {}
    for node in list(graph.node):
        if node.name in targets:
            w = numpy_helper.to_array(inits[node.input[1]])
            s = np.maximum(amax[node.input[0]], 1e-5) ** alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha)
            s = s.astype(np.float32)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
            inv, smoothed = f"{node.name}_smooth_inv", f"{node.name}_smoothed_input"
            graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            rebuilt.append(helper.make_node("Mul", [node.input[0], inv], [smoothed], name=f"{node.name}_smooth"))
            node.input[0] = smoothed
            scales[node.name] = float(s.max())
        rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    onnx.save(model, str(out))
    return scales



def size_breakdown(onnx_bytes: bytes) -> dict[str, int]:
    """Where the bytes of a serialized ONNX model go: tensor data (initializers) vs the rest
    (nodes, tensor names, shapes, metadata). For a tiny model the rest dominates, so int8
    weights barely shrink the file: said in the stage's info and a warning, not hidden."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    data = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    return {"file_bytes": len(onnx_bytes), "tensor_bytes": int(data), "graph_bytes": len(onnx_bytes) - int(data)}

"""Cut a backbone into segments at chosen blocks, with torch.fx.

The model is traced once with its blocks as leaves (children of an ``nn.Sequential`` /
``nn.ModuleList`` — residual stages, MLP layers — and every ``nn.TransformerEncoderLayer``). A
``nn.TransformerEncoder`` called on one tensor is unrolled into its layers (+ final norm), so
its layers become cut points too. Each cut must leave exactly one value alive across it (the
block's output): a skip connection around the cut, a second input, or a non-tensor output is
refused with a ConfigError naming the cut. The segments are ``fx.GraphModule``s that share the
model's submodules; running them in order computes exactly what the model computes.

Why fx rather than per-architecture adapters: one mechanism serves any traceable backbone
(zoo CNNs, a user's nn.Sequential, encoder stacks), and what crosses a cut is read from the graph
instead of assumed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..core.errors import ConfigError

_TOKEN_BLOCKS = (nn.TransformerEncoderLayer,)


def block_names(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that may be cut after (outermost ones win when nested): transformer encoder
    layers; composite children of Sequential/ModuleList containers (residual stages); in a
    container of plain layers (an MLP), the parameter-free layers that follow a layer with
    weights (the activations), so that a cut never falls between a conv and its BatchNorm."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _TOKEN_BLOCKS):
            out[name] = mod
        if not isinstance(mod, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(mod.named_children())
        composite = [(c, m) for c, m in children if any(True for _ in m.children())]
        if composite:
            picked = composite
        else:
            picked = [(c, m) for k, (c, m) in enumerate(children) if k and not any(True for _ in m.parameters())
                      and any(True for _ in children[k - 1][1].parameters())]
        for child_name, child in picked:
            out[f"{name}.{child_name}" if name else child_name] = child
    return out


class _BlockTracer(fx.Tracer):
    def __init__(self, blocks: set[str]):
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.blocks or isinstance(m, (nn.TransformerEncoder, *_TOKEN_BLOCKS)) or super().is_leaf_module(m, qualname)


def _unroll_encoders(gm: fx.GraphModule) -> None:
    """Replace each call of an nn.TransformerEncoder by calls of its layers (+ norm)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.TransformerEncoder):
            continue
        enc = gm.get_submodule(node.target)
        if len(node.args) != 1 or node.kwargs:
            raise ConfigError(f"ExitConfig: {node.target} (nn.TransformerEncoder) is called with a mask; "
                              "early exits support encoders called on one tensor only")
        value = node.args[0]
        with gm.graph.inserting_before(node):
            for i in range(len(enc.layers)):
                value = gm.graph.call_module(f"{node.target}.layers.{i}", (value,))
            if enc.norm is not None:
                value = gm.graph.call_module(f"{node.target}.norm", (value,))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
    gm.graph.lint()


def trace(model: nn.Module) -> fx.GraphModule:
    blocks = set(block_names(model))
    try:
        graph = _BlockTracer(blocks).trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot split this backbone"
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ConfigError(f"ExitConfig: cannot split {type(model).__name__} into segments (torch.fx could not "
                          f"trace it: {type(exc).__name__}: {first}); early exits need a traceable forward "
                          "(Hugging Face BERT models are not supported yet)") from None
    gm = fx.GraphModule(model, graph)
    _unroll_encoders(gm)
    return gm


@dataclass
class Split:
    segments: list[fx.GraphModule]  # len(cuts) + 1; the last one ends at the model's output
    cuts: list[str]  # module names exits sit after, in order
    kinds: list[str]  # per cut: "channels" (pool dims >= 2) or "tokens" (mean over dim 1)
    candidates: list[str]  # every cut point found, in graph order


def _cut_candidates(gm: fx.GraphModule, model: nn.Module) -> list[fx.Node]:
    blocks = block_names(model)
    for name, mod in gm.named_modules():
        if isinstance(mod, _TOKEN_BLOCKS):
            blocks[name] = mod
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target in blocks]


def split(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> Split:
    """Segments of model cut after the blocks matching include and not exclude (fnmatch)."""
    gm = trace(model)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"ExitConfig: {type(model).__name__}.forward takes {len(placeholders)} inputs; "
                          "early exits need a model called as model(x) on one tensor")
    cands = _cut_candidates(gm, model)
    names = [str(n.target) for n in cands]
    # an exit after the last block would only duplicate the final classifier
    chosen = [n for n in cands[:-1] if any(fnmatch.fnmatchcase(str(n.target), p) for p in include)
              and not any(fnmatch.fnmatchcase(str(n.target), p) for p in exclude)]
    if not chosen:
        raise ConfigError(f"ExitConfig.layers.include: no block to put an exit after matches {list(include)} "
                          f"(minus exclude {list(exclude)}); blocks found: {names[:-1] or 'none'}")
    pos = {n: i for i, n in enumerate(nodes)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for cut in chosen:
        crossing = {a for n in nodes[pos[cut] + 1:] + [out_node] for a in n.all_input_nodes
                    if a.op == "placeholder" or (a in pos and pos[a] <= pos[cut])}
        if crossing != {cut}:
            others = sorted(a.name for a in crossing if a is not cut)
            raise ConfigError(f"ExitConfig.layers.include: cannot cut after {cut.target}: besides its output, "
                              f"{others} cross the cut (a skip connection around it); exclude it or pick an outer block")
    if not (isinstance(out_node.args[0], fx.Node)):
        raise ConfigError(f"ExitConfig: {type(model).__name__} returns a {type(out_node.args[0]).__name__}; "
                          "early exits need a model that returns one logits tensor")
    bounds = [pos[c] for c in chosen]
    segments = []
    for k in range(len(bounds) + 1):
        lo = bounds[k - 1] + 1 if k else 0
        hi = bounds[k] + 1 if k < len(bounds) else len(nodes)
        src = placeholders[0] if k == 0 else chosen[k - 1]
        end = chosen[k] if k < len(bounds) else out_node.args[0]
        segments.append(_segment(gm, nodes[lo:hi], src, end))
    kinds = ["tokens" if isinstance(gm.get_submodule(str(c.target)), _TOKEN_BLOCKS) else "channels" for c in chosen]
    for c, kind in zip(chosen, kinds):
        mod = gm.get_submodule(str(c.target))
        if kind == "tokens" and not mod.self_attn.batch_first:
            raise ConfigError(f"ExitConfig: {c.target} has batch_first=False; early exits regroup rows along "
                              "dim 0, build the encoder with batch_first=True")
    return Split(segments, [str(c.target) for c in chosen], kinds, names)


def _segment(gm: fx.GraphModule, body: list[fx.Node], src: fx.Node, end: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {src: g.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a get_attr (parameter / constant) used here: re-read it in this segment
            if a.op != "get_attr":
                raise ConfigError(f"ExitConfig: value {a.name} crosses a cut; cannot split here")
            env[a] = g.get_attr(a.target)
        return env[a]

    for n in body:
        env[n] = g.node_copy(n, arg)
    g.output(arg(end))
    seg = fx.GraphModule(gm, g)
    seg.graph.eliminate_dead_code()
    seg.recompile()
    return seg


def feature_shapes(segments: list[fx.GraphModule], example: torch.Tensor) -> list[torch.Size]:
    """Output shape of every segment on example (eval mode, no grad)."""
    shapes, h = [], example
    with torch.no_grad():
        for k, seg in enumerate(segments):
            try:
                h = seg(h)
            except Exception as exc:  # noqa: BLE001 - a split that does not run is a refusal, not a traceback
                first = str(exc).splitlines()[0][:160] if str(exc) else ""
                raise ConfigError(f"ExitConfig: segment {k} of the split model fails on the task's inputs "
                                  f"({type(exc).__name__}: {first}); exclude the blocks around it") from None
            if not isinstance(h, torch.Tensor):
                raise ConfigError(f"ExitConfig: a block outputs {type(h).__name__}, not a tensor; cannot put an exit after it")
            shapes.append(h.shape)
    return shapes

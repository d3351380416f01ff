"""Attention heads and FFN neurons of BERT-style Hugging Face models, physically removed.

Hand-written slicing rather than Hugging Face's ``prune_heads``: transformers 5.x removed
``PreTrainedModel.prune_heads``, and Torch-Pruning's graph does not know that q/k/v rows come in
head-sized blocks. The surgery is small: keep rows of query/key/value and the matching columns of
the attention output projection (per head), rows of the intermediate dense and columns of the
output dense (per FFN neuron). HF's self-attention reshapes with ``-1`` heads, so fewer heads
need no other change; ``num_attention_heads``/``all_head_size`` are updated for consistency.

Importance (higher = keep), measured on the task's data with hooks on the two output projections:
- "activation": a unit's mean contribution norm to the residual stream, i.e. for head h
  ``mean_t ||ctx_h(t) W_o[:, h]||`` and for neuron i ``mean_t |a_i(t)| * ||W_out[:, i]||``.
  Works on fidelity tasks whose loss is 0 at the dense model (Taylor would see no gradient).
- "taylor": |gate * dL/dgate| of a gate of 1 on each head/neuron (Michel et al. 2019), task loss.
- "magnitude": weight norms only (no data).
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.bounds import check_bounds, count, fraction
from ..core.config_base import config
from ..core.errors import check
from ..core.selection import Layers, layers_field, select_layers
from ..core.stage import StageResult, register_stage
from ..core.task import Task, call_model
from ..core.utils import eval_mode, model_device, removing, to_device

CRITERIA = ("activation", "taylor", "magnitude")


@config
class TransformerPruneConfig:
    """heads_prune / ffn_prune: fraction in [0, 1) of all attention heads / FFN neurons to remove
    (at least one head and one neuron stay in every layer). allocation "global" ranks units of all
    layers together, "uniform" removes the same share in each layer. batches: data batches for
    the data-driven criteria. round_ffn_to: keep each layer's FFN width a multiple of this.
    layers: which blocks are pruned (a LayerSelection on the block names, e.g.
    ``encoder.layer.0``; default all); a block it does not select keeps every head and FFN unit
    and is named in the info's ``skipped``. Fractions are of the selected blocks' units."""

    heads_prune: float = fraction(0.25, high_open=True)
    ffn_prune: float = fraction(0.25, high_open=True)
    criterion: str = "activation"
    allocation: str = "uniform"
    batches: int = count(4, 1, 100_000)
    split: str = "train"
    round_ffn_to: int = count(8, 1, 4096)
    layers: Layers = layers_field()

    def __post_init__(self) -> None:
        check_bounds(self)
        f = "TransformerPruneConfig"
        for name in ("heads_prune", "ffn_prune"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and 0 <= v < 1, f"{f}.{name}", f"must be a fraction in [0, 1), got {v!r}")
        check(self.criterion in CRITERIA, f"{f}.criterion", f"unknown criterion {self.criterion!r}; use one of {', '.join(CRITERIA)}")
        check(self.allocation in ("uniform", "global"), f"{f}.allocation", f"must be 'uniform' or 'global', got {self.allocation!r}")
        check(isinstance(self.batches, int) and self.batches >= 1, f"{f}.batches", f"must be an integer >= 1, got {self.batches!r}")
        check(self.split in ("train", "val", "test"), f"{f}.split", f"must be train, val or test, got {self.split!r}")
        check(isinstance(self.round_ffn_to, int) and self.round_ffn_to >= 1, f"{f}.round_ffn_to", "must be an integer >= 1")


@dataclass
class Block:
    """One transformer layer's prunable parts (module references)."""

    name: str
    attn: nn.Module  # has .query/.key/.value Linears and .attention_head_size
    attn_out: nn.Linear  # heads -> hidden
    ffn_in: nn.Linear  # hidden -> intermediate
    ffn_out: nn.Linear  # intermediate -> hidden

    @property
    def heads(self) -> int:
        return self.attn.query.out_features // self.attn.attention_head_size


def find_blocks(model: nn.Module) -> list[Block]:
    """BERT-style layers: ``.attention.self.{query,key,value}``, ``.attention.output.dense``,
    ``.intermediate.dense``, ``.output.dense``."""
    blocks = []
    for name, mod in model.named_modules():
        attn = getattr(getattr(mod, "attention", None), "self", None)
        if attn is None or not all(isinstance(getattr(attn, k, None), nn.Linear) for k in ("query", "key", "value")):
            continue
        try:
            blocks.append(Block(name, attn, mod.attention.output.dense, mod.intermediate.dense, mod.output.dense))
        except AttributeError:
            continue
    return blocks


# ---------------------------------------------------------------------------- importance
def _unit_view(x: torch.Tensor, units: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], units, x.shape[-1] // units)


def _score_hooks(block: Block, scores: dict, gates: dict | None, mask_ref: list) -> list:
    """Pre-hooks on the two output projections: accumulate activation scores, or apply gates."""
    heads = block.heads

    def on_attn(mod, args):
        ctx = args[0]
        if gates is not None:
            g = gates[(block.name, "heads")]
            return (_unit_view(ctx, heads).mul(g[:, None]).reshape(ctx.shape),)
        w = _unit_view(mod.weight, heads).permute(1, 0, 2)  # (heads, hidden, d)
        contrib = torch.einsum("...hd,hod->...ho", _unit_view(ctx, heads), w).norm(dim=-1)
        _add(scores, (block.name, "heads"), _masked_mean(contrib, mask_ref[0]))
        return None

    def on_ffn(mod, args):
        act = args[0]
        if gates is not None:
            return (act * gates[(block.name, "ffn")],)
        contrib = act.abs() * mod.weight.norm(dim=0)
        _add(scores, (block.name, "ffn"), _masked_mean(contrib, mask_ref[0]))
        return None

    return [block.attn_out.register_forward_pre_hook(on_attn), block.ffn_out.register_forward_pre_hook(on_ffn)]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all token positions (real tokens only when an attention mask is known)."""
    x = x.detach().reshape(-1, *x.shape[2:]) if x.dim() > 2 else x.detach()
    if mask is not None and mask.numel() == x.shape[0]:
        m = mask.reshape(-1).to(x.dtype)
        return (x * m[:, None]).sum(0) / m.sum().clamp_min(1)
    return x.mean(0)


def _add(acc: dict, key: Any, value: torch.Tensor) -> None:
    acc[key] = acc.get(key, 0) + value.float().cpu()


def unit_scores(model: nn.Module, blocks: list[Block], cfg: TransformerPruneConfig, task: Task) -> dict:
    """(block name, "heads"|"ffn") -> score per unit."""
    if cfg.criterion == "magnitude":
        out = {}
        for b in blocks:
            qkv = torch.cat([_unit_view(getattr(b.attn, k).weight.T, b.heads) for k in ("query", "key", "value")], 0)
            o = _unit_view(b.attn_out.weight, b.heads)
            out[(b.name, "heads")] = (qkv.pow(2).sum((0, 2)) + o.pow(2).sum((0, 2))).sqrt().detach()
            out[(b.name, "ffn")] = (b.ffn_in.weight.norm(dim=1) * b.ffn_out.weight.norm(dim=0)).detach()
        return out
    device = model_device(model)
    scores: dict = {}
    gates = None
    if cfg.criterion == "taylor":
        gates = {}
        for b in blocks:
            gates[(b.name, "heads")] = torch.ones(b.heads, device=device, requires_grad=True)
            gates[(b.name, "ffn")] = torch.ones(b.ffn_in.out_features, device=device, requires_grad=True)
    mask_ref: list = [None]
    hooks = [h for b in blocks for h in _score_hooks(b, scores, gates, mask_ref)]
    with eval_mode(model), removing(hooks):
        for i, (inputs, targets) in enumerate(task.split(cfg.split)):
            if i >= cfg.batches:
                break
            inputs = to_device(inputs, device)
            mask_ref[0] = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            with torch.set_grad_enabled(gates is not None):
                out = call_model(model, inputs)
                if gates is not None:
                    task.loss(out, to_device(targets, device)).backward()
                    for key, g in gates.items():
                        _add(scores, key, g.grad.abs())
                        g.grad = None
    check(bool(scores), "TransformerPruneConfig.split", f"the task's {cfg.split!r} split gave no batches")
    return scores


# ---------------------------------------------------------------------------- selection
def choose_keep(scores: dict, blocks: list[Block], cfg: TransformerPruneConfig) -> dict:
    """(block, kind) -> sorted indices to keep."""
    keep = {}
    for kind, share, step in (("heads", cfg.heads_prune, 1), ("ffn", cfg.ffn_prune, cfg.round_ffn_to)):
        keys = [(b.name, kind) for b in blocks]
        n_remove = {k: int(len(scores[k]) * share) for k in keys}
        if cfg.allocation == "global" and share > 0:
            normed = {k: scores[k] / scores[k].mean().clamp_min(1e-12) for k in keys}
            flat = torch.cat([normed[k] for k in keys])
            thr = flat.sort().values[int(len(flat) * share) - 1] if int(len(flat) * share) else -1
            n_remove = {k: int((normed[k] <= thr).sum()) for k in keys}
        for k in keys:
            n = len(scores[k])
            kept = max(1, n - n_remove[k])
            if step > 1 and n >= step:
                kept = max(step, kept // step * step)
            keep[k] = scores[k].argsort(descending=True)[:kept].sort().values
    return keep


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep ``idx`` along weight dim 0 (outputs) or 1 (inputs), in place."""
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, idx).clone())
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).clone())
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def prune_block(block: Block, heads_keep: torch.Tensor, ffn_keep: torch.Tensor) -> None:
    d = block.attn.attention_head_size
    rows = (heads_keep[:, None] * d + torch.arange(d)).reshape(-1)
    for k in ("query", "key", "value"):
        _slice_linear(getattr(block.attn, k), rows, 0)
    _slice_linear(block.attn_out, rows, 1)
    block.attn.num_attention_heads = len(heads_keep)
    block.attn.all_head_size = len(rows)
    _slice_linear(block.ffn_in, ffn_keep, 0)
    _slice_linear(block.ffn_out, ffn_keep, 1)


def prune_transformer(model: nn.Module, cfg: TransformerPruneConfig, task: Task) -> tuple[nn.Module, dict]:
    """A pruned copy of model and a per-layer record (heads and FFN widths before/after)."""
    model = copy.deepcopy(model)
    blocks = find_blocks(model)
    check(bool(blocks), "TransformerPruneConfig", "no BERT-style layer (attention.self.query/key/value, "
          "intermediate.dense, output.dense) found in the model; use StructuredPruneConfig instead")
    selected = selected_blocks(model, blocks, cfg)
    params_before = sum(p.numel() for p in model.parameters())
    scores = unit_scores(model, selected, cfg, task)
    keep = choose_keep(scores, selected, cfg)
    layers, skipped, chosen = {}, {}, {b.name for b in selected}
    for b in blocks:
        before = (b.heads, b.ffn_in.out_features)
        if b.name in chosen:
            prune_block(b, keep[(b.name, "heads")], keep[(b.name, "ffn")])
            heads_kept = keep[(b.name, "heads")].tolist()
        else:
            skipped[b.name] = "not selected by layers: every head and FFN unit kept"
            heads_kept = list(range(before[0]))
        layers[b.name] = {"heads_before": before[0], "heads_after": b.heads, "heads_kept": heads_kept,
                          "ffn_before": before[1], "ffn_after": b.ffn_in.out_features, "selected": b.name in chosen}
    info = {"params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
            "layers": layers, "skipped": skipped}
    return model, info


def selected_blocks(model: nn.Module, blocks: list[Block], cfg: TransformerPruneConfig) -> list[Block]:
    """The blocks ``cfg.layers`` selects (by block name and module). A pattern that matches no
    module of the model, or a selection that leaves no block, is refused in one line (as
    structured pruning refuses an exclude pattern that matches nothing)."""
    modules = [n for n, _ in model.named_modules()]
    f = "TransformerPruneConfig.layers"
    named = ", ".join(repr(b.name) for b in blocks[:3]) + (", ..." if len(blocks) > 3 else "")
    for part in ("include", "exclude"):
        unknown = [p for p in getattr(cfg.layers, part) if not any(fnmatch.fnmatchcase(n, p) for n in modules)]
        check(not unknown, f"{f}.{part}", f"no module matches {unknown[:1]} in the model; the blocks are named {named}")
    picked = {n for n, _ in select_layers(model, cfg.layers)}
    selected = [b for b in blocks if b.name in picked]
    check(bool(selected), f, f"selects none of the {len(blocks)} blocks ({cfg.layers.describe()}); the blocks are "
          f"named {named}")
    return selected


@register_stage(TransformerPruneConfig, copy_input=False)  # prunes its own copy
def apply(model: nn.Module, cfg: TransformerPruneConfig, task: Task) -> StageResult:
    """Stage entry point: a physically smaller copy (the input model is not modified)."""
    pruned, info = prune_transformer(model, cfg, task)
    return StageResult(pruned, info)

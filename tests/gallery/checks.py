"""The checks of a conformance cell (cells.py runs the technique; this file judges the result).

A cell is **supported** when the technique runs and its result is right:

* the compressed model runs on the model's own inputs and returns the same kind of output
  (Tensor / tuple / dict / ModelOutput) of the same shape, finite;
* outputs stay within the technique's stated bound of the reference (int8 quantization: relative
  L2 error of the main output <= ``INT8_BOUND``; low-rank: each factorized layer's measured
  relative Frobenius error equals the ``rel_fro_error`` it reports; N:M: every group has at most
  N non-zeros; weight sharing: each shared layer has at most 2**bits distinct values);
* ties are kept: Parameters shared by several names and modules registered under several names
  still resolve to one object (or the technique refused);
* the stage's claimed numbers equal ``measure``'s: structured pruning's MACs and parameters,
  low-rank's MAC saving, the file size it reports;
* every layer the technique could have handled but left alone is named in a warning (or in its
  ``info`` as skipped / float);
* its compact format saves (``StageResult.save``) and ``measure`` runs on the result.

It is **refused** when the technique raises a :class:`torchslim.core.errors.TorchslimError` whose
message is one line, before changing the model. Anything else (another exception, a wrong
result) fails the cell with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.core.task import as_tensor, call_model

# relative L2 error of the main output, int8 weights + activations; random-init logits are small
# and centred, so this is a loose bound (trained models do much better); 0.25 still catches
# layers computed wrongly or a backend running a different graph
INT8_BOUND = 0.25
MEASURE_FAST = {"latency": False, "memory": False}


class CellError(AssertionError):
    """The technique ran but its result is wrong (a silent deviation)."""


@dataclass
class Outcome:
    status: str  # "supported" | "refused" | "warned" (ran; deviates beyond the bound and a warning says why)
    detail: str = ""


@dataclass
class Ctx:
    name: str
    ref: nn.Module
    model: nn.Module
    example: Any
    task: Any
    ref_out: Any
    warnings: list[str] = field(default_factory=list)
    result: Any = None
    cfg: Any = None
    status: str = "supported"

    def warned(self, layer: str) -> bool:
        return any(layer in w for w in self.warnings)


# ----------------------------------------------------------------------------- helpers
def forward(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return call_model(model, inputs)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        vals = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
        return [t for v in vals for t in flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def check_output_like(ref: Any, out: Any) -> None:
    ref_kind, kind = _kind(ref), _kind(out)
    if ref_kind != kind:
        raise CellError(f"output changed kind: {ref_kind} -> {kind}")
    a, b = as_tensor(ref), as_tensor(out)
    if a.shape != b.shape:
        raise CellError(f"main output shape {tuple(a.shape)} -> {tuple(b.shape)}")
    if not torch.isfinite(b.float()).all():
        raise CellError("main output has NaN/inf")


def _kind(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return "Tensor"
    if hasattr(out, "to_tuple"):
        return "ModelOutput"
    if isinstance(out, Mapping):
        return "dict"
    if isinstance(out, (tuple, list)):
        return f"tuple[{len(out)}]"
    return type(out).__name__


def rel_error(ref: Any, out: Any) -> float:
    a, b = as_tensor(ref).float(), as_tensor(out).float()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def tie_groups(model: nn.Module) -> tuple[list[list[str]], list[list[str]]]:
    """Names sharing one Parameter, and names sharing one module (groups of >= 2)."""
    by_param: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(n)
    by_mod: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if n and any(True for _ in m.parameters(recurse=False)):
            by_mod.setdefault(id(m), []).append(n)
    return [g for g in by_param.values() if len(g) > 1], [g for g in by_mod.values() if len(g) > 1]


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _parametrized_key(model: nn.Module, path: str) -> tuple | None:
    """(original tensor, parametrization objects) behind a parametrized ``path``, else None."""
    from torch.nn.utils import parametrize

    owner, _, attr = path.rpartition(".")
    mod = _resolve(model, owner) if owner else model
    if isinstance(mod, nn.Module) and isinstance(getattr(type(mod), attr, None), property):
        # computed on access (a fake-quant wrapper's weight): tied when the tensors it is
        # computed from are one, i.e. the wrapped layers still share their Parameter
        return ("computed from", *(_storage_ptr(t) for t in _inner_weights(model, path)))
    if not isinstance(mod, nn.Module) or not parametrize.is_parametrized(mod, attr):
        return None
    plist = mod.parametrizations[attr]
    return (id(plist.original), *(id(f) for f in plist))


def check_ties(ctx: Ctx, model: nn.Module) -> None:
    params, mods = tie_groups(ctx.ref)
    for group in mods:
        objs = [_resolve(model, n) for n in group]
        if len({id(o) for o in objs}) > 1:
            raise CellError(f"module used twice split: {', '.join(group)} are now different modules "
                            f"({', '.join(type(o).__name__ for o in objs)})")
    for group in params:
        keys = [_parametrized_key(model, n) for n in group]
        if any(k is not None and k[0] == "computed from" for k in keys) and not all(k is not None for k in keys):
            # a fake-quant wrapper tied to a plain user (an Embedding tied to a quantized head):
            # the Parameter tie holds when the wrapper still computes from that very tensor
            ptrs = {k[1:] if k is not None else (_storage_ptr(_resolve(model, n)),) for n, k in zip(group, keys)}
            if len(ptrs) > 1:
                raise CellError(f"tie broken: {', '.join(group)} no longer share one tensor")
            continue
        if all(k is not None for k in keys):
            # computed on every access (shared weights): tied when every name computes from the
            # same original tensor through the same parametrization objects
            if len(set(keys)) > 1:
                raise CellError(f"tie broken: {', '.join(group)} are parametrized apart")
            continue
        objs = [_resolve(model, n) for n in group]
        found = [o for o in objs if isinstance(o, torch.Tensor)]
        if len(found) < 2:
            # the layers were replaced; the tie must survive inside the replacements
            found = [t for n in group for t in _inner_weights(model, n)]
            if len(found) < 2:
                continue
        ptrs = {_storage_ptr(t) for t in found}
        if len(ptrs) > 1:
            raise CellError(f"tie broken: {', '.join(group)} no longer share one tensor")
        if any(t.numel() == 0 for t in found):
            raise CellError(f"tied Parameter emptied: {', '.join(group)} has 0 elements")


def _inner_weights(model: nn.Module, path: str) -> list[torch.Tensor]:
    mod_path, _, attr = path.rpartition(".")
    mod = _resolve(model, mod_path) if mod_path else model
    if not isinstance(mod, nn.Module):
        return []
    out = []
    for n, t in list(mod.named_parameters()) + list(mod.named_buffers()):
        if n.split(".")[-1] == attr:
            out.append(t)
    return out[:1]


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensor subclasses without storage
        return id(t)


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules a weight technique could act on: those owning a weight matrix (dim >= 2), other than
    the root, embeddings and parameter holders such as class tokens or position tables."""
    out = {}
    for n, m in model.named_modules():
        if not n or isinstance(m, nn.Embedding):
            continue
        own = [(pn, p) for pn, p in m.named_parameters(recurse=False) if p.dim() >= 2]
        own = [(pn, p) for pn, p in own if not any(k in pn for k in ("embed", "token", "pos", "rel_"))]
        if own:
            out[n] = m
    return out


def module_macs(model: nn.Module, inputs: Any) -> int:
    """A lower bound on one forward's MACs, counted independently of torchslim: forward hooks on
    Linear / Conv / HF Conv1D modules plus the closed forms of nn.MultiheadAttention (projections
    and both attention products) and nn.LSTM / nn.GRU. Matmuls outside such modules (attention in
    HF models, F.linear in custom layers) are not counted, so a correct count is >= this."""
    total = [0]
    inside_mha: set[int] = set()

    def hook(m, args, out):
        if not args or not isinstance(args[0], torch.Tensor) or id(m) in inside_mha:
            return
        x = args[0]
        if isinstance(m, nn.Linear):
            total[0] += x.numel() // m.in_features * m.in_features * m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd) and isinstance(out, torch.Tensor):
            k = math.prod(m.kernel_size) * m.in_channels // m.groups
            total[0] += out.numel() * k
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            total[0] += x.numel() // m.weight.shape[0] * m.weight.numel()
        elif isinstance(m, nn.MultiheadAttention):
            q = x if m.batch_first or x.dim() == 2 else x.transpose(0, 1)
            k = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else x
            k = k if m.batch_first or k.dim() == 2 else k.transpose(0, 1)
            b, lq, e = (1, *q.shape) if q.dim() == 2 else q.shape
            lk = k.shape[-2]
            total[0] += b * (lq * e * e + 2 * lk * e * m.kdim + 2 * lq * lk * e + lq * e * e)
        elif isinstance(m, (nn.LSTM, nn.GRU)):
            gates = 4 if isinstance(m, nn.LSTM) else 3
            steps = x.numel() // m.input_size
            dirs = 2 if m.bidirectional else 1
            for layer in range(m.num_layers):
                inp = m.input_size if layer == 0 else m.hidden_size * dirs
                total[0] += dirs * steps * gates * m.hidden_size * (inp + m.hidden_size)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            inside_mha.add(id(m.out_proj))
        handles.append(m.register_forward_hook(hook))
    try:
        forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def check_skips(ctx: Ctx, handled: set[str], accounted: set[str], what: str) -> None:
    """Every candidate layer that was not handled must be named in a warning or in info."""
    cands = candidate_layers(ctx.ref)
    ref_mods = dict(ctx.ref.named_modules())
    done = {id(p) for n in handled if n in ref_mods for p in ref_mods[n].parameters(recurse=False)}

    def tied_to_handled(m: nn.Module) -> bool:  # its matrices are another handled layer's (a tie)
        return all(id(p) in done for p in m.parameters(recurse=False) if p.dim() >= 2)

    silent = [n for n, m in cands.items()
              if n not in handled and n not in accounted and not ctx.warned(n) and not tied_to_handled(m)]
    if silent:
        more = f" (+{len(silent) - 6} more)" if len(silent) > 6 else ""
        raise CellError(f"{what} skipped {len(silent)} layer(s) without a warning: {', '.join(silent[:6])}{more}")


def _layer_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _skipped_names(info: dict) -> set[str]:
    return {s.split(" ")[0] for s in info.get("skipped", [])}


def _params_changed(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return True
    return any(not torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))

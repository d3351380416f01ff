"""Low-rank factorization: a Linear/Conv layer replaced by two thinner ones via truncated SVD.

Linear ``W (out×in) ≈ B·A`` with ``B = U_r·√S_r`` and ``A = √S_r·V_rᵀ`` becomes
``Linear(in, r) -> Linear(r, out)`` (bias kept on the second). A k×k Conv is reshaped to
``out × (in·k·k)`` and becomes ``Conv(in, r, k×k) -> Conv(r, out, 1×1)`` (stride, padding and
dilation on the first). By Eckart–Young the truncation is the best rank-r approximation:
``||W - W_r||_F² = Σ_{i>r} σ_i²``, which is reported per layer as a relative error.

A layer is only replaced where it really saves MACs: ``r·(in + out) <= (1 - min_mac_saving)·in·out``
(in counted as in·k·k for convs); otherwise it is left as is and the record says why.

A tied weight is factorized once and its users share the two factors (a tie with a layer that
cannot be factorized skips it); nn.MultiheadAttention's out_proj (read as ``.weight`` by its
parent), GRU/LSTM and other weight layers left alone are named in one warning. MACs count
every call of a layer, as ``torchslim.measure`` does.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..core.bounds import bounded, check_bounds, count, fraction
from ..core.config_base import config
from ..core.errors import ConfigError, check
from ..core.selection import Layers, layers_field
from ..core.stage import StageResult, register_stage, training_hooks
from ..core.task import Task
from ..core.train import TrainConfig, fit
from .speed import hooked_forward, is_faster, layer_inputs

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@config(renamed={"ratio": "params_keep"}, stage="lowrank")
class LowRankConfig:
    """How to choose each layer's rank (exactly one of energy / params_keep / rank).

    energy: keep the smallest r whose singular values hold this share of Σσ², in (0, 1].
    params_keep: share of each layer's parameters (= MACs) kept, in (0, 1):
        r = floor(params_keep·in·out/(in+out)).
    rank: a fixed rank, or {layer_name: rank}; larger than min(in, out) is an error.
    layers: which Linear/Conv modules (groups == 1) to consider (a LayerSelection; default all).
        Exact names (no glob characters) must each be a module that factorizes; with glob
        patterns, selected modules that cannot be factorized are skipped with the reason.
    min_mac_saving: only factorize a layer whose MACs drop by at least this share, in [0, 1).
    finetune: training budget run after factorizing (None: no fine-tune).
    min_saved_macs / speed_batch: factorize a layer only when the pair removes at least this
        many multiply-adds per call on a batch of ``speed_batch`` samples. Fewer MACs is not
        faster by itself in eager PyTorch: the second kernel's launch and its pass over the
        activations cost more than a small saving (tv_mobilenet_v3_small ran at 0.64x with all
        its 43 small layers factorized). 2M MACs (~0.1 ms of arithmetic on one core) is a rule
        of thumb, deterministic so that runs reproduce; 0 = factorize whatever saves MACs.
    speed_check / min_speedup: also time each pair against its layer on the input the layer
        sees (lowrank_speed.py) and keep it only when at least ``min_speedup`` faster. Opt-in:
        timings vary between runs, so a run with it on may not reproduce exactly.
    """

    energy: float | None = fraction(None, low_open=True)
    params_keep: float | None = fraction(None, low_open=True, high_open=True)
    rank: int | dict[str, int] | None = None
    layers: Layers = layers_field()
    min_mac_saving: float = fraction(0.1, high_open=True)
    finetune: TrainConfig | None = None
    min_saved_macs: int = bounded(2_000_000, 0, 10**15, integer=True)
    speed_batch: int = count(32, 1, 4096)
    speed_check: bool = False
    min_speedup: float = fraction(0.05, high_open=True)

    def __post_init__(self) -> None:
        check_bounds(self)
        given = [n for n in ("energy", "params_keep", "rank") if getattr(self, n) is not None]
        check(len(given) == 1, "LowRankConfig", f"give exactly one of energy, params_keep, rank (got {given or 'none'})")
        check(self.energy is None or 0 < self.energy <= 1, "LowRankConfig.energy", f"must be in (0, 1], got {self.energy!r}")
        check(self.params_keep is None or 0 < self.params_keep < 1, "LowRankConfig.params_keep",
              f"must be in (0, 1), got {self.params_keep!r}")
        ranks = self.rank.values() if isinstance(self.rank, dict) else [] if self.rank is None else [self.rank]
        check(all(isinstance(r, int) and r >= 1 for r in ranks), "LowRankConfig.rank", f"ranks must be integers >= 1, got {self.rank!r}")
        check(0 <= self.min_mac_saving < 1, "LowRankConfig.min_mac_saving", f"must be in [0, 1), got {self.min_mac_saving!r}")
        check(self.finetune is None or isinstance(self.finetune, TrainConfig), "LowRankConfig.finetune", "must be a TrainConfig or None")


def _exact_names(cfg: LowRankConfig) -> list[str] | None:
    """The module names ``layers`` lists exactly (no glob characters), or None (patterns/all)."""
    inc = cfg.layers.include
    if inc == ("*",) or any(c in p for p in inc for c in "*?["):
        return None
    return [n for n in inc if cfg.layers.named(n)]


def _factorizable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, _CONVS) and m.groups == 1)


def _direct_readers(model: nn.Module) -> set[int]:
    """ids of Linears whose parent reads their ``.weight`` directly (nn.MultiheadAttention's
    out_proj): replaced by two layers, the parent's forward would fail."""
    out = {id(m) for m in model.modules() if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            out.update(id(c) for c in m.children())
    return out


def _skip_reason(m: nn.Module, direct: set[int]) -> str | None:
    """Why layer m is not factorized (None: it can be)."""
    kind = type(m).__name__
    if id(m) in direct:
        return f"{kind}: nn.MultiheadAttention reads its weight directly"
    if isinstance(m, nn.MultiheadAttention):
        return f"{kind}: its in_proj is not a Linear"
    if isinstance(m, nn.RNNBase):
        return f"{kind}: recurrent weights are not factorized"
    if isinstance(m, _CONVS) and m.groups != 1:
        return f"{kind}: groups={m.groups}"
    return None if _factorizable(m) else f"{kind}: not a Linear or Conv"


def factorizable_names(model: nn.Module) -> set[str]:
    """Names of the modules ``factorize_layers`` can split (Linear, Conv with groups 1, not read
    directly by a parent): the one predicate the policy search shares with this stage."""
    direct = _direct_readers(model)
    return {n for n, m in model.named_modules(remove_duplicate=False) if _skip_reason(m, direct) is None}


Group = list[tuple[list[str], nn.Module]]  # the modules (each with all its names) holding one weight


def _candidates(model: nn.Module, cfg: LowRankConfig) -> tuple[list[Group], list[str]]:
    """(groups to factorize, skipped layers as 'name (why)').

    A weight held by several modules (tied) is one group, factorized once; a module reachable
    under several names is one entry with every name. A tie with a module that cannot be
    factorized (an Embedding, say) skips the whole group: factorizing one side would untie it."""
    mods = dict(model.named_modules())
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(n)
    every = dict(model.named_modules(remove_duplicate=False))
    direct, skipped, chosen = _direct_readers(model), [], []
    exact = _exact_names(cfg)
    if exact is None and not isinstance(cfg.rank, dict):
        for n, m in mods.items():
            if n == "parametrizations" or n.endswith(".parametrizations") or ".parametrizations." in f".{n}":
                continue  # torch.nn.utils.parametrize internals (their module is considered)
            if not cfg.layers.matches(n, m):
                continue
            w = getattr(m, "weight", None)
            weighty = (isinstance(w, torch.Tensor) and w.dim() >= 2) or any(p.dim() >= 2 for p in m.parameters(recurse=False))
            why = _skip_reason(m, direct) if weighty else "-"
            if why is None:
                chosen.append(m)
            elif why != "-":
                skipped.append(f"{n or '<root>'} ({why})")
    else:
        if isinstance(cfg.rank, dict):  # per-layer ranks name the layers (within layers, if given)
            for n in cfg.rank:
                check(n in every, "LowRankConfig.rank", f"model has no module {n!r}")
            names = exact if exact is not None else [n for n in cfg.rank if cfg.layers.matches(n, every[n])]
            missing = [n for n in (exact or []) if n not in cfg.rank]
            check(not missing, "LowRankConfig.rank", f"no rank given for layer {missing[:1]}; add it or drop it from layers")
        else:
            names = exact
        for n in names:
            check(n in every, "LowRankConfig.layers", f"model has no module {n!r}")
            m = every[n]
            check(_factorizable(m), "LowRankConfig.layers", f"{n!r} is a {type(m).__name__}; only Linear and Conv (groups=1) factorize")
            why = _skip_reason(m, direct)
            check(why is None, "LowRankConfig.layers", f"{n!r} cannot be factorized ({why})")
            chosen.append(m)
    holders: dict[int, list[nn.Module]] = {}  # id(parameter) -> the distinct modules holding it
    for m in mods.values():
        for t in m.parameters(recurse=False):
            holders.setdefault(id(t), []).append(m)
    groups, seen = [], set()
    for m in chosen:
        if id(m) in seen:
            continue
        w = m.weight  # a parametrized weight is computed anew on each access: no Parameter holds it
        users = holders.get(id(w), [m])
        seen.update(id(u) for u in users)
        bad = [u for u in users if u is not m and (getattr(u, "weight", None) is not w or _skip_reason(u, direct))]
        if bad:
            skipped.append(f"{names_of[id(m)][0]} (weight tied with {names_of[id(bad[0])][0]}, which is not factorized)")
        else:
            groups.append([(names_of[id(u)], u) for u in users])
    return groups, skipped


def _positions(model: nn.Module, mods: dict[str, nn.Module], inputs: Any) -> dict[str, int]:
    """Output positions per sample of each layer, summed over its calls in one forward (1 for
    a Linear on vectors called once, H·W for a conv; a module called twice counts twice)."""
    seen: dict[str, int] = {n: 0 for n in mods}

    def hook(name: str):
        def fn(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            width = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            seen[name] += out.numel() // (out.shape[0] * width)
        return fn

    hooked_forward(model, [(m, hook(n)) for n, m in mods.items()], inputs)
    return seen


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<=r} σ_i² >= energy · Σ σ_i²."""
    e = s.double().pow(2)
    share = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return min(int(torch.searchsorted(share, torch.tensor([energy - 1e-12], dtype=share.dtype)).item()) + 1, len(s))


def _wanted_rank(name: str, out_f: int, in_f: int, cfg: LowRankConfig, s: torch.Tensor | None) -> int:
    if cfg.rank is not None:
        return cfg.rank[name] if isinstance(cfg.rank, dict) else cfg.rank
    if cfg.params_keep is not None:
        return max(1, math.floor(cfg.params_keep * out_f * in_f / (out_f + in_f)))
    return rank_for_energy(s, cfg.energy)


class LowRankPair(nn.Sequential):
    """The two thin layers of a factorized layer, run in sequence. Code that reads the replaced
    layer's ``weight`` / ``bias`` directly still finds them: Hugging Face models read
    ``projection.weight.dtype`` (ViT's patch embedding and ~60 others), fused fast paths read the
    values. ``weight`` is the product of the factors, read-only (no gradient flows through it),
    cached until either factor changes (a reader in every forward must not pay a matmul each
    time), and not part of the state dict: such readers see the layer the pair computes."""

    @property
    def weight(self) -> torch.Tensor:
        a, b = self[0].weight, self[1].weight
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), a.dtype, a.device)
        if self.__dict__.get("_dense_key") != key:
            with torch.no_grad():
                w = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            self.__dict__["_dense"] = w.reshape(b.shape[0], *a.shape[1:])
            self.__dict__["_dense_key"] = key
        return self.__dict__["_dense"]

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias


def _split(m: nn.Module, r: int, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> nn.Sequential:
    """The two thin layers holding B = U_r·√S_r and A = √S_r·V_rᵀ (bias on the second)."""
    sq = s[:r].sqrt()
    a = (sq[:, None] * vh[:r]).to(m.weight.dtype)
    b = (u[:, :r] * sq[None, :]).to(m.weight.dtype)
    dev, has_bias = m.weight.device, m.bias is not None
    if isinstance(m, nn.Linear):
        first, second = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=has_bias)
    else:
        conv = type(m)
        first = conv(m.in_channels, r, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                     bias=False, padding_mode=m.padding_mode)
        second = conv(r, m.out_channels, 1, bias=has_bias)
    with torch.no_grad():
        first.weight.copy_(a.reshape(first.weight.shape))
        second.weight.copy_(b.reshape(second.weight.shape))
        if has_bias:
            second.bias.copy_(m.bias)
    pair = LowRankPair(first, second).to(dev)
    pair.weight  # noqa: B018 - fill the cache now, outside any measured forward
    return pair


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        # its fused fast path reads linear1.weight / linear2.weight directly (a factorized pair
        # has none); ``activation_relu_or_gelu`` only chooses that path, the slow path runs the
        # submodules with the same math (as quantize/ptq.py does for fake-quant layers)
        parent.activation_relu_or_gelu = False


def _group_rank(group: Group, cfg: LowRankConfig) -> str:
    """The name whose rank a tied group takes; ConfigError if its names ask for different ranks."""
    names = [n for ns, _ in group for n in ns]
    if not isinstance(cfg.rank, dict):
        return names[0]
    given = {n: cfg.rank[n] for n in names if n in cfg.rank}
    check(len(set(given.values())) <= 1, "LowRankConfig.rank",
          f"layers {' and '.join(repr(n) for n in names)} hold one tied weight but get ranks "
          f"{', '.join(f'{n}={r}' for n, r in given.items())}; give them the same rank")
    return next(iter(given), names[0])


def _split_tied(group: Group, r: int, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> list[nn.Sequential]:
    """One pair of thin layers per user of the weight, all holding the same two factor weights
    (and a bias shared before stays shared), so the tie survives the factorization."""
    splits = [_split(m, r, u, s, vh) for _, m in group]
    biases: dict[int, nn.Parameter] = {}
    for (_, m), seq in zip(group, splits):
        seq[0].weight, seq[1].weight = splits[0][0].weight, splits[0][1].weight
        if m.bias is not None:
            seq[1].bias = biases.setdefault(id(m.bias), seq[1].bias)
    return splits


def factorize_layers(model: nn.Module, cfg: LowRankConfig, example_inputs: Any,
                     timing_inputs: Any = None) -> list[dict[str, Any]]:
    """Replace the chosen layers of model in place; return one record per considered layer.

    Every rank is checked against its layer before any layer is changed. A tied weight is
    factorized once (its users keep sharing the factors); layers that cannot be factorized
    are named in one warning. MACs count every call of a layer in one forward, as
    torchslim.measure does."""
    groups, skipped = _candidates(model, cfg)
    if skipped:
        warnings.warn(f"low-rank skipped layers it cannot factorize: {', '.join(skipped)}", stacklevel=2)
    keys = [_group_rank(g, cfg) for g in groups]
    shapes = [(g[0][1].weight.shape[0], g[0][1].weight[0].numel()) for g in groups]
    if cfg.rank is not None:
        for key, (o, i) in zip(keys, shapes):
            r = _wanted_rank(key, o, i, cfg, None)
            check(r <= min(o, i), "LowRankConfig.rank",
                  f"rank {r} is larger than layer {key!r} allows (weight {o}x{i}: at most {min(o, i)})")
    pos = _positions(model, {ns[0]: m for g in groups for ns, m in g}, example_inputs)
    seen = layer_inputs(model, {ns[0]: m for g in groups for ns, m in g}, timing_inputs) if timing_inputs is not None else {}
    records = []
    for g, key, (o, i) in zip(groups, keys, shapes):
        # float32 SVD (LAPACK via torch): float64 is ~10x slower and gains nothing at this error
        u, s, vh = torch.linalg.svd(g[0][1].weight.detach().reshape(o, i).float(), full_matrices=False)
        r = min(_wanted_rank(key, o, i, cfg, s), len(s))
        e = s.double().pow(2)
        tail = e[r:].sum() / e.sum().clamp_min(1e-300)
        applied = r * (o + i) <= (1 - cfg.min_mac_saving) * o * i
        why = f"r(in+out) = {r * (o + i)} saves < {cfg.min_mac_saving:.0%} of in*out = {o * i}"
        saved = cfg.speed_batch * pos[g[0][0][0]] * (o * i - r * (o + i))
        if applied and saved < cfg.min_saved_macs:
            applied, why = False, f"saves {saved:,} MACs per call at batch {cfg.speed_batch} < min_saved_macs {cfg.min_saved_macs:,}"
        pairs = _split_tied(g, r, u, s, vh) if applied else []
        x = seen.get(g[0][0][0])
        if applied and x is not None:  # fewer MACs is not faster by itself: time it (lowrank_speed.py)
            applied, timing = is_faster(g[0][1], pairs[0], x, cfg.min_speedup)
            why = f"not faster: {timing}"
        tied = [n for ns, _ in g for n in ns]
        for names, m in g:
            p = pos[names[0]]
            rec = {"layer": names[0], "type": type(m).__name__, "weight": [o, i], "rank": r, "full_rank": len(s),
                   "macs_before": p * o * i, "macs_after": p * r * (o + i), "rel_fro_error": float(tail.sqrt()),
                   "applied": applied}
            if len(tied) > 1:
                rec["tied"] = tied
            if not applied:
                rec["macs_after"] = rec["macs_before"]
                rec["reason"] = why
            records.append(rec)
        if applied:
            for (names, _), seq in zip(g, pairs):
                for n in names:  # every name of the module, so an alias stays one module
                    _set_module(model, n, seq)
    return records


@register_stage(LowRankConfig)
def apply(model: nn.Module, cfg: LowRankConfig, task: Task) -> StageResult:
    """Factorize model in place (MACs counted on one test sample) and fine-tune if asked."""
    if not any(_factorizable(m) for m in model.modules()):
        raise ConfigError("LowRankConfig: the model has no Linear or Conv (groups=1) layer to factorize")
    before = task.evaluate(model)
    timing = task.example_inputs(cfg.speed_batch) if cfg.speed_check else None
    records = factorize_layers(model, cfg, task.example_inputs(1), timing)
    info: dict[str, Any] = {"layers": records, "metric_before": before, "metric_factorized": task.evaluate(model)}
    info["macs_before"] = sum(r["macs_before"] for r in records)
    info["macs_after"] = sum(r["macs_after"] for r in records)
    if cfg.finetune is not None and any(r["applied"] for r in records):
        info["fit"] = fit(model, task, cfg.finetune, hooks=training_hooks(model)).to_dict()
    info["metric_after"] = task.evaluate(model)
    return StageResult(model=model, info=info)

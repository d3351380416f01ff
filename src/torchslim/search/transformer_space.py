"""Transformer search space (issue 13, item 1): per encoder layer, attention heads and FFN units
kept or the whole layer dropped, and per Linear group (Q/K/V, attention output, FFN in, FFN out)
int8 or float.

A ``TransformerPolicy`` is plain data; ``to_stages`` writes it as ordinary recipe stages, as
``policy.py`` does for CNNs, so a found plan re-runs through ``torchslim run``:

- one ``layer_drop`` stage first when layers are dropped (``drop``: their names; each becomes an
  identity, ``pruning.layers``; the choices of a dropped layer are void and not written);
- one ``transformer_prune`` stage per distinct (heads, FFN) width pair, touching exactly its own
  layers (``layers.exclude`` = the other encoder layers; without that field in
  ``TransformerPruneConfig``, only one width pair for every layer is expressible);
- one ``quantize`` stage on ONNX Runtime (dynamic int8, per-channel: QAttention / MatMulInteger)
  with the float groups in ``layers.exclude``, FFN-output layers chosen as 8-bit weight blocks
  of 128 (MatMulNBits, B2's fidelity fix) in ``ort_options.block_layers``, optional
  SmoothQuant (alpha 0.6, B2's) on the Q/K/V and FFN-input activations, and the graph fused
  (QAttention) or not (``ort_options.optimize``).

Legal widths: >= 1 head per layer (multiples of 1 head), FFN units a multiple of ``ffn_multiple``
(64 by default: a coarse grid, not a kernel need; ORT's int8 MatMulInteger FFN pair at 1 thread
on the 2-core AVX-512 VNNI AMD EPYC cost the same per unit, within noise, at 1344..1536 units, 1380 included).
Cost is measured, not modelled: ``transformer_eval.PlanEvaluator`` applies a plan's stages
the way the runner does (``policy.evaluate``), scores it on the val split and times the result
end to end against the fp32 PyTorch model, interleaved (``compare_latency``), once per plan.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.errors import check
from ..pruning.transformer import TransformerPruneConfig, find_blocks

GROUPS = ("qkv", "attn_out", "ffn_in", "ffn_out")
#: Per group, the legal precisions: int8 (per-channel dynamic), float, and for the FFN output
#: (GELU outputs, heavy tails: most of the int8 error in B2) 8-bit weight blocks of 128.
CHOICES = {"qkv": ("int8", "float"), "attn_out": ("int8", "float"), "ffn_in": ("int8", "float"),
           "ffn_out": ("int8", "blocks", "float")}
SMOOTH = {"smooth_alpha": 0.6, "smooth_layers": ["*.attention.self.*", "*.intermediate.dense"]}
BLOCKS = {"block_bits": 8, "block_size": 128}


@dataclass(frozen=True)
class EncoderLayer:
    """One BERT-style layer: its module name, widths and the Linear names of each group."""

    name: str
    heads: int
    head_size: int
    ffn: int
    hidden: int
    linears: dict[str, tuple[str, ...]]


@dataclass
class TransformerSpace:
    """The legal choices per encoder layer: ``heads[i]`` / ``ffn[i]`` the kept counts allowed for
    layer i (descending, the first = untouched); ``per_layer`` False when widths can only be
    chosen once for every layer (``TransformerPruneConfig`` without ``layers``); ``drop`` True when
    dropping whole layers is searched (a policy may drop layers either way; one always stays)."""

    layers: tuple[EncoderLayer, ...]
    heads: tuple[tuple[int, ...], ...]
    ffn: tuple[tuple[int, ...], ...]
    ffn_multiple: int
    per_layer: bool
    drop: bool = False

    def check(self, policy: TransformerPolicy) -> None:
        """A one-line ConfigError when ``policy`` asks for a width or precision not in the space."""
        names = [x.name for x in self.layers]
        for n in policy.drop:
            check(n in names, f"TransformerPolicy.drop[{n}]", f"names no encoder layer; use one of {names}")
        check(len(set(policy.drop)) < len(names), "TransformerPolicy.drop", "keep at least one encoder layer")
        for i, layer in enumerate(self.layers):
            h, f = policy.heads.get(layer.name, layer.heads), policy.ffn.get(layer.name, layer.ffn)
            check(h in self.heads[i], f"TransformerPolicy.heads[{layer.name}]", f"{h} is not one of {list(self.heads[i])}")
            check(f in self.ffn[i], f"TransformerPolicy.ffn[{layer.name}]", f"{f} is not one of {list(self.ffn[i])}")
        for key, q in (policy.quant or {}).items():
            layer, _, group = key.rpartition(":")
            check(group in CHOICES and q in CHOICES[group], f"TransformerPolicy.quant[{key}]",
                  f"{q!r} is not one of {list(CHOICES.get(group, ()))} for group {group!r}")
            check(layer in {x.name for x in self.layers}, f"TransformerPolicy.quant[{key}]", "names no encoder layer")
        if not self.per_layer:
            pairs = {(policy.heads.get(x.name, x.heads), policy.ffn.get(x.name, x.ffn)) for x in self.layers
                     if x.name not in policy.drop}
            check(len(pairs) == 1, "TransformerPolicy.heads", "per-layer widths need TransformerPruneConfig.layers; "
                  "give every layer the same heads and FFN widths")


    def describe(self) -> dict[str, Any]:
        """The space as plain data (search.json's ``space``, as ``SearchSpace.describe``)."""
        return {"kind": "transformer", "layers": [x.name for x in self.layers], "heads": [list(h) for h in self.heads],
                "ffn": [list(f) for f in self.ffn], "ffn_multiple": self.ffn_multiple, "per_layer": self.per_layer,
                "layer_drop": self.drop, "groups": list(GROUPS), "choices": {k: list(v) for k, v in CHOICES.items()}}


def layers_field_available() -> bool:
    """True when ``TransformerPruneConfig`` has the one ``layers`` selection (per-layer plans)."""
    return "layers" in {f.name for f in dataclasses.fields(TransformerPruneConfig)}


def _kept(n: int, keep: float, multiple: int, least: int) -> int:
    return max(least, min(n, round(n * keep / multiple) * multiple))


def build_transformer_space(model: nn.Module, heads_keep: tuple[float, ...] = (1.0, 0.75, 0.5),
                            ffn_keep: tuple[float, ...] = (1.0, 0.875, 0.75, 0.5),
                            ffn_multiple: int = 64, drop: bool = False) -> TransformerSpace:
    """The space of ``model``'s BERT-style layers: kept shares rounded to legal counts; ``drop``:
    whether whole layers may be dropped too."""
    check(all(0 < k <= 1 for k in (*heads_keep, *ffn_keep)), "build_transformer_space", "kept shares must be in (0, 1]")
    check(ffn_multiple >= 1, "build_transformer_space.ffn_multiple", "must be >= 1")
    names = {id(m): n for n, m in model.named_modules()}
    blocks = find_blocks(model)
    check(bool(blocks), "build_transformer_space", "no BERT-style layer (attention.self.query/key/value, "
          "intermediate.dense, output.dense) in the model; use search.build_space for CNNs")
    layers, heads, ffn = [], [], []
    for b in blocks:
        qkv = tuple(names[id(getattr(b.attn, k))] for k in ("query", "key", "value"))
        lin = {"qkv": qkv, "attn_out": (names[id(b.attn_out)],), "ffn_in": (names[id(b.ffn_in)],),
               "ffn_out": (names[id(b.ffn_out)],)}
        n_ffn = b.ffn_in.out_features
        layers.append(EncoderLayer(b.name, b.heads, b.attn.attention_head_size, n_ffn, b.ffn_out.out_features, lin))
        heads.append(tuple(sorted({_kept(b.heads, k, 1, 1) for k in (1.0, *heads_keep)}, reverse=True)))
        step = ffn_multiple if n_ffn % ffn_multiple == 0 else 1  # an odd width is only kept or cut freely
        ffn.append(tuple(sorted({_kept(n_ffn, k, step, step) for k in (1.0, *ffn_keep)}, reverse=True)))
    return TransformerSpace(tuple(layers), tuple(heads), tuple(ffn), ffn_multiple, layers_field_available(), drop)


@dataclass
class TransformerPolicy:
    """heads / ffn: layer name -> kept count (a layer left out is untouched); quant:
    "<layer>:<group>" -> "int8" | "float" | "blocks" (None: no int8 stage); smooth: SmoothQuant
    on the Q/K/V and FFN-input activations of the int8 stage; fuse: the int8 graph fused by
    onnxruntime.transformers first (QAttention) or left as exported (``ort_options.optimize``:
    which is faster depends on the CPU, so the search measures both); drop: encoder layers removed
    whole (their other choices are void)."""

    heads: dict[str, int] = field(default_factory=dict)
    ffn: dict[str, int] = field(default_factory=dict)
    quant: dict[str, str] | None = None
    smooth: bool = False
    fuse: bool = True
    drop: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {"heads": dict(self.heads), "ffn": dict(self.ffn),
               "quant": None if self.quant is None else dict(sorted(self.quant.items())), "smooth": self.smooth,
               "fuse": self.fuse}
        if self.drop:  # only then: the keys (and Optuna parameters) of earlier plans stay the same
            out["drop"] = sorted(self.drop)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerPolicy:
        return cls(dict(data.get("heads", {})), dict(data.get("ffn", {})), data.get("quant"), bool(data.get("smooth")),
                   bool(data.get("fuse", True)), tuple(sorted(data.get("drop", ()))))

    def key(self) -> str:
        """The cache key: plans equal in effect share it (a dropped layer's other choices are
        void, so they are left out; a plan that drops nothing keys as it always did)."""
        out = self.to_dict()
        if self.drop:
            gone = set(self.drop)
            out["heads"] = {k: v for k, v in out["heads"].items() if k not in gone}
            out["ffn"] = {k: v for k, v in out["ffn"].items() if k not in gone}
            if out["quant"] is not None:
                out["quant"] = {k: v for k, v in out["quant"].items() if k.rsplit(":", 1)[0] not in gone}
        return json.dumps(out, sort_keys=True)


def uniform_policy(space: TransformerSpace, heads_keep: float = 1.0, ffn_keep: float = 1.0,
                   quant: str | None = "int8", smooth: bool = False, fuse: bool = True) -> TransformerPolicy:
    """Every layer at the legal width nearest the kept shares, every group at ``quant``."""
    heads = {x.name: min(space.heads[i], key=lambda h: (abs(h - x.heads * heads_keep), -h)) for i, x in enumerate(space.layers)}
    ffn = {x.name: min(space.ffn[i], key=lambda f: (abs(f - x.ffn * ffn_keep), -f)) for i, x in enumerate(space.layers)}
    q = None if quant is None else {f"{x.name}:{g}": quant for x in space.layers for g in GROUPS}
    return TransformerPolicy(heads, ffn, q, smooth, fuse)


def b2_policy(space: TransformerSpace, fuse: bool = True) -> TransformerPolicy:
    """B2's int8 recipe on full widths: every group int8 with SmoothQuant, FFN out as 8-bit
    blocks of 128 (recipes/minilm_int8.yaml)."""
    p = uniform_policy(space, quant="int8", smooth=True, fuse=fuse)
    p.quant = {k: ("blocks" if k.endswith(":ffn_out") else v) for k, v in p.quant.items()}
    return p


def _fraction(removed: int, n: int) -> float:
    """A share that TransformerPruneConfig turns back into exactly ``removed`` of ``n`` units
    (it removes ``int(n * share)``; the half unit keeps float rounding off the boundary)."""
    return 0.0 if removed == 0 else round((removed + 0.5) / n, 6)


def to_stages(policy: TransformerPolicy, space: TransformerSpace, criterion: str = "activation",
              batches: int = 4, finetune: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The recipe stages (plain mappings, as in YAML) that carry out ``policy``; ``finetune``
    (TrainConfig fields; None = none) is one ``train`` stage after the pruning, before int8."""
    space.check(policy)
    dropped = set(policy.drop)
    kept = [x for x in space.layers if x.name not in dropped]
    stages: list[dict[str, Any]] = []
    if dropped:
        stages.append({"name": "drop-layers", "layer_drop": {"drop": [x.name for x in space.layers if x.name in dropped]}})
    by_pair: dict[tuple[float, float], list[str]] = {}
    for x in kept:
        h, f = policy.heads.get(x.name, x.heads), policy.ffn.get(x.name, x.ffn)
        if (h, f) != (x.heads, x.ffn):
            by_pair.setdefault((_fraction(x.heads - h, x.heads), _fraction(x.ffn - f, x.ffn)), []).append(x.name)
    for (hp, fp), names in sorted(by_pair.items()):
        cfg: dict[str, Any] = {"heads_prune": hp, "ffn_prune": fp, "criterion": criterion, "allocation": "uniform",
                               "batches": batches, "round_ffn_to": 1}
        others = [x.name for x in kept if x.name not in names]
        if others:
            check(space.per_layer, "TransformerPolicy.heads", "per-layer widths need TransformerPruneConfig.layers")
            cfg["layers"] = {"exclude": others}  # block names (TransformerPruneConfig.layers)
        stages.append({"name": f"heads-{hp:g}-ffn-{fp:g}", "transformer_prune": cfg})
    if finetune is not None:
        stages.append({"name": "finetune", "train": dict(finetune)})
    if policy.quant is not None:
        layer_of = {x.name: x for x in space.layers}
        floats, blocks = [], []
        for key, q in sorted(policy.quant.items()):
            lname, _, group = key.rpartition(":")
            if lname in dropped:
                continue
            names = list(layer_of[lname].linears[group])
            floats += names if q == "float" else []
            blocks += names if q == "blocks" else []
        q: dict[str, Any] = {"bits": 8, "mode": "dynamic", "granularity": "per_channel", "backend": "onnxruntime",
                             "layers": {"exclude": floats}}
        options: dict[str, Any] = {}
        if blocks:
            options.update(BLOCKS, block_layers=blocks)
        if policy.smooth:
            options.update(copy.deepcopy(SMOOTH))
        if not policy.fuse:
            options["optimize"] = False
        if options:
            q["ort_options"] = options
        stages.append({"quantize": q})
    return stages


def to_recipe(policy: TransformerPolicy, space: TransformerSpace, base: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """A whole recipe: ``base`` (task, model, seed, measure, export...) + the policy's stages."""
    recipe = {k: copy.deepcopy(v) for k, v in base.items() if k not in ("stages", "search", "train")}
    recipe["stages"] = to_stages(policy, space, **kw)
    return recipe


def macs_per_token(policy: TransformerPolicy, space: TransformerSpace, seq: int = 32) -> float:
    """Multiply-accumulates per token of the encoder layers (Linears + attention at ``seq``)."""
    total = 0.0
    for x in space.layers:
        if x.name in policy.drop:
            continue
        d, a = x.hidden, policy.heads.get(x.name, x.heads) * x.head_size
        total += 4 * d * a + 2 * seq * a + 2 * d * policy.ffn.get(x.name, x.ffn)
    return total


def suggest(trial: Any, space: TransformerSpace) -> TransformerPolicy:
    """One Optuna trial's policy (categorical choices; per layer when the space allows it). With
    ``space.drop`` each layer may be dropped; a trial that drops them all keeps the last one."""
    heads, ffn = {}, {}
    for i, x in enumerate(space.layers):
        tag = x.name if space.per_layer else "all"
        heads[x.name] = trial.suggest_categorical(f"heads:{tag}", list(space.heads[i]))
        ffn[x.name] = trial.suggest_categorical(f"ffn:{tag}", list(space.ffn[i]))
    quant = {f"{x.name}:{g}": trial.suggest_categorical(f"quant:{x.name}:{g}", list(CHOICES[g]))
             for x in space.layers for g in GROUPS}
    drop: tuple[str, ...] = ()
    if space.drop:
        drop = tuple(x.name for x in space.layers if trial.suggest_categorical(f"drop:{x.name}", [False, True]))
        drop = drop[:len(space.layers) - 1]  # at least one layer stays: the last asked for is kept
    return TransformerPolicy(heads, ffn, quant, trial.suggest_categorical("smooth", [False, True]),
                             trial.suggest_categorical("fuse", [True, False]), drop)


def trial_params(policy: TransformerPolicy, space: TransformerSpace) -> dict[str, Any]:
    """The Optuna parameters of ``policy`` (to enqueue a known plan, e.g. a uniform arm)."""
    out: dict[str, Any] = {}
    for x in space.layers:
        tag = x.name if space.per_layer else "all"
        out[f"heads:{tag}"] = policy.heads.get(x.name, x.heads)
        out[f"ffn:{tag}"] = policy.ffn.get(x.name, x.ffn)
        for g in GROUPS:
            out[f"quant:{x.name}:{g}"] = (policy.quant or {}).get(f"{x.name}:{g}", "float")
    out["smooth"], out["fuse"] = policy.smooth, policy.fuse
    if space.drop:
        out.update({f"drop:{x.name}": x.name in policy.drop for x in space.layers})
    return out


__all__ = ["CHOICES", "GROUPS", "EncoderLayer", "TransformerPolicy", "TransformerSpace", "b2_policy",
           "build_transformer_space", "layers_field_available", "macs_per_token", "suggest", "to_recipe", "to_stages",
           "trial_params", "uniform_policy"]

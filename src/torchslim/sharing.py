"""Weight sharing (Deep Compression, Han et al. ICLR 2016 §3): per-layer k-means of the weights.

Each selected layer's weight becomes ``codebook[indices] * mask``: a codebook of k = 2**bits
shared values (an ``nn.Parameter``), one small index per weight (a uint8 buffer) and the pruning
mask (weights that were zero stay zero). It is a torch parametrization, so the model keeps
running as an ordinary ``nn.Module``. Training it updates the codebook only: the backward of
``codebook[indices]`` sums the gradients of all weights sharing a centroid into that centroid,
which is the paper's centroid fine-tuning (checked against a hand scatter-add in the tests).

k-means is scikit-learn's ``KMeans`` started from explicit centroids: ``linear`` (evenly spaced
between the min and max weight; the paper finds it best because it keeps the few large
weights), ``density`` (evenly spaced quantiles) or ``random`` (k weights drawn at random).

A tied weight (one Parameter used by several modules, or a module registered under several
names) is clustered once: every user gets the same parametrization, so they keep one weight
and one codebook. Weight layers without a ``weight`` (GRU/LSTM, attention's in_proj) are
named in one warning.
"""

from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .core import progress
from .core.bounds import check_bounds, count, seed_field
from .core.config_base import config
from .core.errors import check
from .core.selection import Layers, layers_field
from .core.stage import StageResult, register_stage, training_hooks
from .core.task import Task
from .core.train import TrainConfig, fit
from .core.utils import materialize_parametrized
from .export.archive import save_archive

INITS = ("linear", "density", "random")


@config
class ShareConfig:
    """How to share weights.

    bits: index width for every selected layer (k = 2**bits centroids, 1..8), or
        ``{pattern: bits}`` by module-name pattern (fnmatch, first match wins; a layer no
        pattern matches is left alone).
    init: centroid initialization: "linear" (best in the paper), "density" or "random".
    layers: which modules to share (a LayerSelection: include / exclude globs on module names,
        types, filter_fn); default every module with a ``weight`` of dim >= 2.
    keep_zeros: pruned (zero) weights stay exactly zero and are not clustered.
    finetune: centroid fine-tuning budget (trains codebooks and the other free parameters,
        e.g. biases; the shared structure and zeros are kept); None = no fine-tuning.
    fp16_floats: afterwards round codebooks and the remaining float tensors (biases, norms) to
        float16 values, so the archive stores them in 16 bits without loss (accuracy is measured
        after the rounding).
    max_iter / seed: k-means iteration cap and seed (the random init and sklearn's tie-breaks).
    """

    bits: int | dict[str, int] = 5
    init: str = "linear"
    layers: Layers = layers_field()
    keep_zeros: bool = True
    finetune: TrainConfig | None = None
    fp16_floats: bool = False
    max_iter: int = count(100, 1, 100_000)
    seed: int = seed_field()

    def _table(self) -> dict[str, int]:
        return self.bits if isinstance(self.bits, dict) else {"*": self.bits}

    def __post_init__(self) -> None:
        check_bounds(self)
        table = self._table()
        check(len(table) > 0, "ShareConfig.bits", "the per-layer table is empty; give an int or {pattern: bits}")
        for pattern, b in table.items():
            check(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8, "ShareConfig.bits",
                  f"must be an integer from 1 to 8 (k = 2**bits centroids), got {b!r}"
                  + ("" if pattern == "*" else f" for {pattern!r}"))
        check(self.init in INITS, "ShareConfig.init", f"unknown init {self.init!r}; use one of {', '.join(INITS)}")
        check(self.finetune is None or isinstance(self.finetune, TrainConfig), "ShareConfig.finetune",
              f"must be a TrainConfig or None, got {type(self.finetune).__name__}")
        check(isinstance(self.max_iter, int) and self.max_iter >= 1, "ShareConfig.max_iter",
              f"must be an integer >= 1, got {self.max_iter!r}")

    def bits_for(self, name: str, module: nn.Module | None = None) -> int | None:
        """Index bits for module ``name``, or None when it is not shared."""
        if not self.layers.named(name) or (module is not None and not self.layers.kind_ok(module, name)):
            return None
        return next((b for p, b in self._table().items() if fnmatchcase(name, p)), None)


class SharedWeight(nn.Module):
    """Parametrization: weight = codebook[indices] * mask (the stored weight is ignored)."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("indices", indices.to(torch.uint8))
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        # uint8 would index as a boolean mask: widen to int64 for a gather.
        return self.codebook[self.indices.long()] * self.mask


def init_centroids(values: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """Starting centroids for 1-D k-means (Deep Compression §3.2)."""
    if init == "linear":
        return np.linspace(values.min(), values.max(), k)
    if init == "density":
        return np.quantile(values, np.linspace(0.0, 1.0, k))
    return np.random.default_rng(seed).choice(values, size=k, replace=False)


def cluster_weight(
    weight: torch.Tensor, bits: int, init: str = "linear", keep_zeros: bool = True, seed: int = 0, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(codebook, indices, mask, inertia) for one weight tensor: k-means of its (non-zero) values."""
    flat = weight.detach().reshape(-1).cpu().double().numpy()
    mask = flat != 0 if keep_zeros else np.ones(flat.shape, dtype=bool)
    values = flat[mask]
    k = 2**bits
    uniq = np.unique(values)
    if len(uniq) <= k:  # already few values: they are the codebook, exactly
        codebook, labels, inertia = (uniq if len(uniq) else np.zeros(1)), np.searchsorted(uniq, values), 0.0
    else:
        from sklearn.cluster import KMeans

        start = init_centroids(values, k, init, seed).reshape(-1, 1)
        with warnings.catch_warnings():  # duplicate density starts only warn; sklearn relocates them
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=k, init=start, n_init=1, max_iter=max_iter, random_state=seed).fit(values.reshape(-1, 1))
        codebook, labels, inertia = km.cluster_centers_.reshape(-1), km.labels_, float(km.inertia_)
    indices = np.zeros(flat.shape, dtype=np.uint8)
    indices[mask] = labels
    dev = weight.device
    return (torch.as_tensor(codebook, dtype=weight.dtype, device=dev),
            torch.as_tensor(indices, device=dev).reshape(weight.shape),
            torch.as_tensor(mask, device=dev).reshape(weight.shape), inertia)


def share_layer(module: nn.Module | list[nn.Module], bits: int, cfg: ShareConfig) -> dict[str, Any]:
    """Cluster the weight of module (or of every module of a list that holds one tied weight
    Parameter) once and parametrize each with the same SharedWeight; return the record."""
    users = module if isinstance(module, list) else [module]
    # e.g. shared before: start from its values (one Parameter for tied users; safe on a deep copy)
    materialize_parametrized(users)
    lead = users[0]
    for m in users[1:]:
        if m.weight is not lead.weight:
            m.weight = lead.weight
    weight = lead.weight
    numel = weight.numel()  # weight becomes the (emptied) original below
    codebook, indices, mask, inertia = cluster_weight(weight, bits, cfg.init, cfg.keep_zeros, cfg.seed, cfg.max_iter)
    shared = SharedWeight(codebook, indices, mask)
    for m in users:  # one parametrization for all users: one codebook, trained once
        parametrize.register_parametrization(m, "weight", shared, unsafe=True)
    # The dense original is ignored by SharedWeight: drop its storage so memory and parameter
    # counts reflect the shared form (codebook + indices + mask) and it is never trained.
    # Emptied once, after every user of a tied original is parametrized (none reads it then).
    original = lead.parametrizations.weight.original
    original.data = original.data.new_empty(0)
    original.requires_grad_(False)
    nonzeros = int(mask.sum())
    return {"bits": bits, "k": len(codebook), "numel": numel, "nonzeros": nonzeros,
            "kept": nonzeros / max(numel, 1), "inertia": inertia}


def _weight_key(m: nn.Module) -> int:
    """Identity of the weight m runs with: its SharedWeight if shared already, else the tensor."""
    if parametrize.is_parametrized(m, "weight"):  # a computed weight is a new tensor each access
        first = m.parametrizations.weight[0]
        return id(first) if isinstance(first, SharedWeight) else id(m.parametrizations.weight)
    return id(m.weight)


def plan(model: nn.Module, cfg: ShareConfig) -> tuple[list[tuple[list[str], list[nn.Module], int]], list[str]]:
    """([(names, modules, bits)] one entry per distinct weight, [skipped layer (why)]).

    A weight reachable under several names (a module registered twice, or one Parameter
    used by several modules) is one entry with every name; its names must agree on bits
    (ConfigError before any work otherwise)."""
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(n)
    groups: dict[int, tuple[list[str], list[nn.Module]]] = {}
    skipped = []
    for n, m in model.named_modules():
        if ".parametrizations." in f".{n}." or isinstance(m, parametrize.ParametrizationList):
            continue  # torch.nn.utils.parametrize internals (their module is considered)
        names = names_of[id(m)]
        selected = [x for x in names if cfg.bits_for(x, m) is not None]
        # a weight the module holds (a Parameter, or a parametrized one), not a computed view
        # such as lowrank.LowRankPair.weight (its factors are shared instead)
        own = m._parameters.get("weight") is not None or parametrize.is_parametrized(m, "weight")
        has_weight = own and m.weight.dim() >= 2
        if has_weight:
            names_, mods = groups.setdefault(_weight_key(m), ([], []))
            names_ += names
            mods.append(m)
        others = [p for p, t in m.named_parameters(recurse=False) if t.dim() >= 2 and p != "weight"]
        if selected and others and not has_weight:
            why = "recurrent weights are not shared" if isinstance(m, nn.RNNBase) else f"{', '.join(others)} not shared"
            skipped.append(f"{n or '<root>'} ({type(m).__name__}: {why})")
    out = []
    for names, mods in groups.values():
        by_name = {x: mod for mod in mods for x in names_of[id(mod)]}
        bits = {x: cfg.bits_for(x, by_name.get(x)) for x in names}
        wanted = sorted({b for b in bits.values() if b is not None})
        if not wanted:
            continue
        check(len(wanted) == 1, "ShareConfig.bits",
              f"layers {' and '.join(repr(x) for x in names)} hold one tied weight but get bits "
              f"{', '.join(f'{x}={b}' for x, b in bits.items())}; give them the same bits")
        out.append((names, mods, wanted[0]))
    return out, skipped


def shared_layers(model: nn.Module) -> dict[str, SharedWeight]:
    """Module name -> its SharedWeight parametrization."""
    return {name: m.parametrizations.weight[0] for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], SharedWeight)}


@torch.no_grad()
def round_floats_fp16(model: nn.Module) -> None:
    """Round every trainable float tensor and float buffer (not the ignored originals) to fp16 values."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not name.endswith("parametrizations.weight.original"):
            t.copy_(t.to(torch.float16).to(t.dtype))


@register_stage(ShareConfig)
def apply(model: nn.Module, cfg: ShareConfig, task: Task | None = None) -> StageResult:
    """Share the weights of model in place (and return it): cluster, optionally fine-tune the
    centroids on task, optionally round the floats to fp16. ``save`` writes the compact archive."""
    chosen, skipped = plan(model, cfg)
    check(len(chosen) > 0, "ShareConfig.layers", "selects no module with a weight of dim >= 2; check the patterns against model.named_modules()")
    check(cfg.finetune is None or (task is not None and task.train is not None), "ShareConfig.finetune",
          "centroid fine-tuning needs a task with a train split; pass one or set finetune=None")
    if skipped:
        warnings.warn(f"weight sharing skipped layers it cannot handle: {', '.join(skipped)}", stacklevel=2)
    layers = {}
    with progress.bar("weight sharing (k-means)", len(chosen)) as bar:  # one step per layer, named while it runs
        for names, mods, bits in chosen:
            bar.show(layer=names[0], bits=bits)
            layers[names[0]] = share_layer(mods, bits, cfg)
            if len(names) > 1:
                layers[names[0]]["tied"] = names
            bar.advance(1)
    info: dict[str, Any] = {"layers": layers}
    if cfg.finetune is not None:
        # every compression on the model holds (a pruned layer left unshared keeps its zeros)
        info["finetune"] = fit(model, task, cfg.finetune, hooks=training_hooks(model)).to_dict()
    if cfg.fp16_floats:
        round_floats_fp16(model)
    return StageResult(model=model, info=info, save=save_archive)

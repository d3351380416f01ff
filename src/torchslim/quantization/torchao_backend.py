"""torchao inside PyTorch: ``quantize_`` with torchao's own configs, optionally torch.compile.

Schemes that run on this CPU with torchao 0.18 (checked by tests/test_quant_backends.py):
- ``int8_dynamic``: Int8DynamicActivationInt8WeightConfig (int8 weights per channel, activations
  quantized per token at run time);
- ``int8_weight_only``: Int8WeightOnlyConfig;
- ``int4_weight_only``: IntxWeightOnlyConfig(int4, PerGroup) — on CPU torchao stores the int4
  values unpacked in int8 (Int4WeightOnlyConfig needs the mslk/CUDA kernels), so the file is
  int8-sized and the speed is not an int4 kernel's; this is said in the result's info.

Only ``nn.Linear`` is handled by these configs; other weight layers (Conv) are named in
``info["float_layers"]`` and stay float. Without torch.compile torchao's int8 path is often not
faster than fp32 eager on CPU; measure both (``compile=True``). On x86 without VNNI
``int8_dynamic`` in eager ran 0.05x of fp32 (a 1536->384 Linear on 32x40 tokens, 2 threads):
``auto`` does not build it there, and an explicit ``backend="torchao"`` says so once
(isa_plan.py).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import field
from typing import Any

import torch
from torch import nn

from ..core.bounds import check_bounds, count
from ..core.config_base import config
from ..core.errors import check
from ..core.selection import Layers, layers_field

TORCHAO_SCHEMES = ("int8_dynamic", "int8_weight_only", "int4_weight_only")


@config(renamed={"skip": "layers: {exclude: [...]}"})
class TorchaoConfig:
    """scheme: one of TORCHAO_SCHEMES; group_size: int4 group; compile: wrap in torch.compile;
    layers: the Linears quantized (a LayerSelection; what it does not select, e.g. a
    mixed-precision plan's float layers under ``exclude``, is kept float)."""

    scheme: str = "int8_dynamic"
    group_size: int = count(32, 16, 256)
    compile: bool = False
    layers: Layers = layers_field()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bounds(self)
        check(self.scheme in TORCHAO_SCHEMES, "TorchaoConfig.scheme", f"must be one of {TORCHAO_SCHEMES}, got {self.scheme!r}")
        check(self.group_size in (16, 32, 64, 128, 256), "TorchaoConfig.group_size", f"must be 16, 32, 64, 128 or 256, got {self.group_size!r}")


def ao_config(cfg: TorchaoConfig) -> Any:
    """The torchao config object for cfg.scheme."""
    import torchao.quantization as tq

    if cfg.scheme == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if cfg.scheme == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    from torchao.quantization.granularity import PerGroup

    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size))


class _DivideInput(nn.Module):
    """x / divisor before a layer: keeps a SmoothQuant migration when leaving fake-quant."""

    def __init__(self, divisor: torch.Tensor):
        super().__init__()
        self.register_buffer("divisor", divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.divisor


def defake(model: nn.Module) -> nn.Module:
    """Copy of model with every FakeQuantLayer replaced by its float layer (weights as the
    simulation left them: BN folded, smoothed, bias corrected), ready for a real backend.

    Parametrized weights (weight sharing's ``codebook[indices] * mask``, a user's weight norm)
    become plain Parameters holding the values they compute (``core.utils.materialize_parametrized``;
    tied users keep one Parameter): exported as they were, such a weight was a Gather/Mul subgraph,
    which ONNX Runtime's dynamic int8 left float and ``layers.exclude`` could not find."""
    from ..core.utils import materialize_parametrized
    from .fake import FakeQuantLayer

    model = copy.deepcopy(model)
    materialize_parametrized(model)
    done: dict[int, nn.Module] = {}  # one float layer per wrapper: a module registered twice stays one
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, FakeQuantLayer):
            if id(m) not in done:
                layer = m.layer
                if m.input_divisor is not None:
                    div = m.input_divisor if isinstance(layer, nn.Linear) else m.input_divisor.reshape(-1, *([1] * (layer.weight.dim() - 2)))
                    layer = nn.Sequential(_DivideInput(div.detach().clone()), layer)
                done[id(m)] = layer
            model.set_submodule(name, done[id(m)])
    return model


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Swap Hugging Face ``Conv1D`` layers (GPT-2: ``y = x @ W + b`` with W of shape (in, out))
    for the equal ``nn.Linear`` (weight W.T), so torchao quantizes them; returns their names.
    A Conv1D whose weight is tied to another module is left alone (the tie would break)."""
    users: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    done = []
    for name, m in list(model.named_modules()):
        if type(m).__name__ != "Conv1D" or not hasattr(m, "nf") or getattr(m, "weight", None) is None:
            continue
        w = m.weight
        if w.dim() != 2 or users.get(id(w), 0) > 1:
            continue
        lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.detach().T)
            if m.bias is not None:
                lin.bias.copy_(m.bias.detach())
        model.set_submodule(name, lin)
        done.append(name)
    return done


def tied_linears(model: nn.Module, keep: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({follower Linear: leader Linear} for Linears sharing one weight Parameter, {Linear: why
    float} for a Linear whose weight is tied to a module torchao does not quantize, such as an
    Embedding: quantizing it would split the tie into a float and an int8 copy)."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None) if name else None
        if isinstance(w, nn.Parameter) and any(p is w for p in m.parameters(recurse=False)):
            group = users.setdefault(id(w), [])
            if not any(m is other for _, other in group):  # a module under two names is one layer
                group.append((name, m))
    followers, tie_float = {}, {}
    for group in users.values():
        if len(group) < 2:
            continue
        others = [n for n, m in group if not isinstance(m, nn.Linear)]
        linears = [n for n, m in group if isinstance(m, nn.Linear)]
        if others:
            for n in linears:
                tie_float[n] = f"weight tied to {others[0]} ({type(dict(group)[others[0]]).__name__}); kept float so the tie holds"
            continue
        leader = next((n for n in linears if n not in keep), linears[0])
        followers.update({n: leader for n in linears if n != leader})
    return followers, tie_float


MIN_IN_FEATURES = 2  # torchao 0.18's int8 paths fail on a single input feature; 2 and up work


def not_selected(q: nn.Module, cfg: TorchaoConfig) -> set[str]:
    """Names of the Linears of ``q`` (a defaked model) that ``cfg.layers`` keeps float. defake
    keeps names, except that a smoothed layer "a.b" becomes "a.b.1" (after its divide): such a
    Linear is judged by its name in the model the plan was made on."""
    mods = dict(q.named_modules())
    keep = set()
    for name, m in mods.items():
        if not isinstance(m, nn.Linear):
            continue
        parent, _, last = name.rpartition(".")
        wrap = mods.get(parent) if last == "1" else None
        smoothed = isinstance(wrap, nn.Sequential) and isinstance(wrap[0], _DivideInput)
        if not cfg.layers.matches(parent if smoothed else name, m):
            keep.add(name)
    return keep


def torchao_quantize(model: nn.Module, cfg: TorchaoConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(quantized copy of model, info) with torchao's ``quantize_``; float layers are named."""
    from torchao.quantization import quantize_

    cfg = cfg or TorchaoConfig()
    q = defake(model).eval()
    converted = conv1d_to_linear(q)
    keep = not_selected(q, cfg)
    quantized, float_layers = [], {}
    followers, tie_float = tied_linears(q, keep)
    keep |= set(followers) | set(tie_float)
    float_layers.update(tie_float)
    for name, m in q.named_modules():
        if name in tie_float or name in followers:
            continue
        if isinstance(m, nn.Linear) and m.in_features < MIN_IN_FEATURES:
            # torchao's int8 path fails on a Linear(1, 64) ("shape '[64, 1]' is invalid"; checked:
            # 2, 3, 4, 8 inputs work); a layer this small gains nothing from int8 anyway
            float_layers[name] = f"in_features {m.in_features}: torchao's int8 kernels need >= {MIN_IN_FEATURES} inputs"
            keep.add(name)
        elif isinstance(m, nn.Linear) and name not in keep:
            quantized.append(name)
        elif isinstance(m, nn.Linear):
            float_layers[name] = "kept float by the plan"
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            float_layers[name] = f"{type(m).__name__}: torchao {cfg.scheme} handles nn.Linear only"
        elif any(p.dim() >= 2 for p in m.parameters(recurse=False)) and not isinstance(m, nn.MultiheadAttention):
            float_layers[name] = f"{type(m).__name__} holds its own weight matrix; torchao quantizes nn.Linear only"
    named = [f"{n}: {w}" for n, w in float_layers.items() if w != "kept float by the plan"]
    if named:
        warnings.warn("torchao left in float: " + "; ".join(named), stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(q, ao_config(cfg), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn not in keep)
    for name, leader in followers.items():  # a tie between Linears: one int8 weight, used by all
        q.get_submodule(name).weight = q.get_submodule(leader).weight
        if leader in quantized:
            quantized.append(name)
        else:
            float_layers[name] = f"weight tied to {leader}, which stays float"
    info = {"backend": "torchao", "scheme": cfg.scheme, "quantized_layers": len(quantized),
            "float_layers": float_layers, "compiled": cfg.compile}
    if converted:
        info["converted_to_linear"] = converted
    if cfg.scheme == "int4_weight_only":
        info["note"] = "int4 values stored unpacked in int8 on CPU (torchao IntxWeightOnly); no int4 kernel here"
    if cfg.compile:
        q = torch.compile(q)
    return q, info


def save_torchao(model: nn.Module, path: str) -> None:
    """torch.save of the torchao state dict (int8 tensor subclasses keep their int8 storage)."""
    from ..core.utils import atomic_write
    from ..export.digest import stamp_state

    inner = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its module
    state = stamp_state(inner.state_dict())
    atomic_write(path, lambda p: torch.save(state, p))

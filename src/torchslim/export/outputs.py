"""The structure of a model's output across an ONNX graph, whose outputs are a flat list.

A model may return a Tensor, a tuple/list of Tensors, or a mapping of Tensors (a dict, a Hugging
Face ``ModelOutput``). The graph exports every tensor as its own output (``output``,
``output_1``, ...) and ``OutputSpec.rebuild`` gives the caller back the same kind of object,
so a model that returned ``(logits, hidden)`` still does after ONNX Runtime int8.

Deeper structures (GPT-2's ``past_key_values``: tuples of tuples) are not mirrored: the graph
then holds the main tensor only (``as_tensor``: logits / sentence_embedding / the first), and
``OutputSpec.dropped`` says what was left out, so callers can warn instead of deviating silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.task import as_tensor


@dataclass
class OutputSpec:
    kind: str = "tensor"  # "tensor", "tuple", "list" or "mapping"
    keys: tuple[str, ...] = ()
    dropped: str = ""  # what the graph does not return, when the output was deeper than one level
    mapping_type: Any = field(default=None, repr=False, compare=False)  # dict / ModelOutput class

    @property
    def count(self) -> int:
        return len(self.keys) if self.kind == "mapping" else max(1, len(self.keys))

    def names(self) -> list[str]:
        return ["output"] + [f"output_{i}" for i in range(1, self.count)]

    def rebuild(self, leaves: list[torch.Tensor]) -> Any:
        if self.kind == "tensor":
            return leaves[0]
        if self.kind in ("tuple", "list"):
            return tuple(leaves) if self.kind == "tuple" else list(leaves)
        values = dict(zip(self.keys, leaves))
        cls = self.mapping_type
        if cls is None or cls is dict:
            return values
        try:
            return cls(**values)
        except Exception:  # noqa: BLE001 - a mapping class that cannot be rebuilt: a plain dict
            return values

    def to_dict(self) -> dict:
        """Plain data (what a checkpoint stores: its loader builds no torchslim class but modules)."""
        return {"kind": self.kind, "keys": list(self.keys), "dropped": self.dropped}

    @classmethod
    def from_dict(cls, d: dict | None, mapping_type: Any = None) -> OutputSpec:
        d = d or {}
        return cls(d.get("kind", "tensor"), tuple(d.get("keys", ())), d.get("dropped", ""), mapping_type)

    def __getstate__(self) -> dict:
        # only dict survives pickling (a ModelOutput class would have to be imported to load)
        state = self.__dict__.copy()
        state["mapping_type"] = dict if self.kind == "mapping" else None
        return state


def output_spec(out: Any) -> OutputSpec:
    """How the output ``out`` of a model maps onto a flat list of graph outputs."""
    if isinstance(out, torch.Tensor):
        return OutputSpec()
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return OutputSpec("tuple" if isinstance(out, tuple) else "list", tuple(str(i) for i in range(len(out))))
    if isinstance(out, Mapping) and out and all(isinstance(t, torch.Tensor) for t in out.values()):
        return OutputSpec("mapping", tuple(str(k) for k in out), mapping_type=type(out))
    main = as_tensor(out)  # raises a TaskError when there is no tensor to take
    return OutputSpec(dropped=f"the {type(out).__name__} output is nested; the graph returns its main "
                              f"tensor only (shape {tuple(main.shape)})")


def flatten(out: Any, spec: OutputSpec) -> tuple[torch.Tensor, ...]:
    """The graph outputs of ``out`` in ``spec``'s order."""
    if spec.kind == "tensor":
        return (as_tensor(out),)
    if spec.kind == "mapping":
        return tuple(out[k] for k in spec.keys)
    return tuple(out)

"""ONNX export that is checked: export, reload in ONNX Runtime, compare outputs with PyTorch.

Inputs are a Tensor (one graph input named ``input``) or a dict of Tensors (one graph input per
key, e.g. a tokenizer's ``input_ids`` / ``attention_mask``); the outputs are ``output``,
``output_1``, ... for a model returning a tuple or mapping of tensors (see outputs.py). The file
is always one self-contained ``.onnx`` (weights inside, no ``.onnx.data`` sidecar) written
atomically, so its size is the size a user ships.

Exporters: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``) is the default because it is
~5x faster to run here and its graph is the one ONNX Runtime's transformer optimizer knows how to
fuse (Attention, SkipLayerNorm, BiasGelu); ``"dynamo"`` (torch.export + onnxscript, torch's
default) is available, and ``"auto"`` tries dynamo first and falls back to TorchScript.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.bounds import bounded
from ..core.config_base import config
from ..core.errors import ExportError, check
from ..core.utils import atomic_write, eval_mode
from .digest import stamp_onnx_bytes, stamp_onnx_model
from .onnx_narrow import narrow_initializers
from .outputs import OutputSpec, flatten, output_spec

EXPORTERS = ("torchscript", "dynamo", "auto")


@config
class OnnxExportConfig:
    """How to export, on the one config contract (``core.config_base``: strict bounded numbers,
    unknown keys refused, ``to_dict`` / ``from_dict``). opset: ONNX opset (the dynamo exporter
    uses at least 18); dynamic_batch: batch dim is symbolic; dynamic_seq: for dict (token) inputs
    the second dim is symbolic too; exporter: one of EXPORTERS; verify: reload in ONNX Runtime and
    compare with PyTorch; atol/rtol: that comparison's tolerance."""

    opset: int = bounded(17, 11, 21, integer=True)
    dynamic_batch: bool = True
    dynamic_seq: bool = True
    exporter: str = "torchscript"
    verify: bool = True
    atol: float = bounded(1e-4, 0, 1e6)
    rtol: float = bounded(1e-3, 0, 1e6)

    def __post_init__(self) -> None:  # the ranges above are checked by the contract, before this
        check(self.exporter in EXPORTERS, "OnnxExportConfig.exporter",
              f"must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")


class _KwargsAdapter(nn.Module):
    """Positional forward over dict keys, because exporters name graph inputs by position."""

    def __init__(self, model: nn.Module, keys: list[str], spec: OutputSpec | None = None):
        super().__init__()
        self.model, self.keys, self.spec = model, keys, spec or OutputSpec()

    def forward(self, *args: torch.Tensor) -> Any:
        out = flatten(self.model(**dict(zip(self.keys, args))), self.spec)
        return out[0] if len(out) == 1 else out


class _TensorAdapter(nn.Module):
    def __init__(self, model: nn.Module, spec: OutputSpec | None = None):
        super().__init__()
        self.model, self.spec = model, spec or OutputSpec()

    def forward(self, x: torch.Tensor) -> Any:
        out = flatten(self.model(x), self.spec)
        return out[0] if len(out) == 1 else out


@torch.no_grad()
def spec_of(model: nn.Module, example_inputs: Any) -> OutputSpec:
    """The output structure of model on example_inputs (one forward)."""
    return output_spec(model(**example_inputs) if isinstance(example_inputs, Mapping) else model(example_inputs))


def input_names(example_inputs: Any) -> list[str]:
    return list(example_inputs) if isinstance(example_inputs, Mapping) else ["input"]


def to_feed(inputs: Any) -> dict[str, np.ndarray]:
    """A batch's inputs as the ``{name: ndarray}`` feed of a graph made by export_onnx."""
    if isinstance(inputs, Mapping):
        return {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    return {"input": inputs.detach().cpu().numpy()}


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    dynamic_batch: bool = True,
    opset: int = 17,
    config: OnnxExportConfig | None = None,
) -> Path:
    """Export model to one ``.onnx`` file at path, verified in ONNX Runtime; return the path."""
    cfg = config or OnnxExportConfig(opset=opset, dynamic_batch=dynamic_batch)
    with eval_mode(model):
        return _export_checked(model, example_inputs, Path(path), cfg)


def _export_checked(model: nn.Module, example_inputs: Any, path: Path, cfg: OnnxExportConfig) -> Path:
    names = input_names(example_inputs)
    spec = spec_of(model, example_inputs)
    wrapped = _KwargsAdapter(model, names, spec) if isinstance(example_inputs, Mapping) else _TensorAdapter(model, spec)
    wrapped.eval()  # a wrapper left in train mode makes the TorchScript exporter emit training BatchNorm
    args = tuple(example_inputs[k] for k in names) if isinstance(example_inputs, Mapping) else (example_inputs,)
    dims = _dynamic_dims(example_inputs, names, cfg)
    order = {"auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[cfg.exporter]
    errors: list[str] = []
    narrow = any(parametrize.is_parametrized(m) for m in model.modules())  # computed weights (onnx_narrow.py)
    for exporter in order:
        try:
            atomic_write(path, lambda p, ex=exporter: _export_one(wrapped, args, names, dims, p, cfg.opset, ex,
                                                                  spec.names(), narrow))
            break
        except OSError:  # a full disk or a permission error is not the model's fault: stop
            raise
        except Exception as exc:  # noqa: BLE001 - the exporter's error becomes a one-line ExportError
            errors.append(f"{exporter}: {_unsupported(exc)}")
    else:
        raise ExportError(f"ONNX export of {type(model).__name__} failed: " + "; ".join(errors))
    if cfg.verify:
        try:
            verify_onnx(model, example_inputs, path, cfg.atol, cfg.rtol)
        except ExportError:
            path.unlink(missing_ok=True)  # never leave a wrong file where the user asked for one
            raise
    return path


def _dynamic_dims(example_inputs: Any, names: list[str], cfg: OnnxExportConfig) -> dict[str, dict[int, str]]:
    dims: dict[str, dict[int, str]] = {}
    for name in names:
        t = example_inputs[name] if isinstance(example_inputs, Mapping) else example_inputs
        d = {0: "batch"} if cfg.dynamic_batch else {}
        if isinstance(example_inputs, Mapping) and cfg.dynamic_seq and t.ndim >= 2:
            d[1] = "sequence"
        dims[name] = d
    return dims


def _export_one(wrapped, args, names, dims, path: Path, opset: int, exporter: str, outs: list[str],
                narrow: bool = False) -> None:
    import onnx

    if exporter == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of HF models are about constant shapes
            buf = io.BytesIO()  # exported to memory, stamped, written once
            torch.onnx.export(wrapped, args, buf, input_names=names, output_names=outs,
                              dynamic_axes={**dims, **{o: {0: "batch"} for o in outs}} if dims else None,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        data = buf.getvalue()
        if narrow:
            proto = onnx.load_from_string(data)
            narrow_initializers(proto)
            data = proto.SerializeToString()
        path.write_bytes(stamp_onnx_bytes(data))
        return
    shapes = tuple({i: torch.export.Dim.AUTO for i in d} or None for d in dims.values())
    program = torch.onnx.export(wrapped, args, input_names=names, output_names=outs,
                                dynamic_shapes=shapes, opset_version=max(opset, 18),
                                dynamo=True, verbose=False)
    proto = program.model_proto
    if narrow:
        narrow_initializers(proto)
    onnx.save_model(stamp_onnx_model(proto), str(path), save_as_external_data=False)


def _unsupported(exc: Exception) -> str:
    """The op name from an exporter error when it names one, else the error's first line."""
    text = str(exc)
    m = re.search(r"(aten::[\w.]+|aten\.[\w.]+|prim::\w+|torch\.ops\.[\w.]+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if m:
        return f"unsupported op {m.group(1)} ({first[:160]})"
    return f"{type(exc).__name__}: {first[:200]}"


def ort_session(path: str | os.PathLike | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session with full graph optimization and `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path) if not isinstance(path, bytes) else path, so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Max |ORT - PyTorch| over every output on example_inputs; ExportError when beyond
    atol + rtol*|ref|."""
    raw = model(**example_inputs) if isinstance(example_inputs, Mapping) else model(example_inputs)
    refs = [t.float().cpu().numpy() for t in flatten(raw, output_spec(raw))]
    outs = ort_session(path).run(None, to_feed(example_inputs))
    err, ok = 0.0, len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        err = max(err, float(np.max(np.abs(out - ref))) if ref.size else 0.0)
        ok = ok and out.shape == ref.shape and np.allclose(out, ref, atol=atol, rtol=rtol)
    if not ok:
        raise ExportError(f"ONNX export of {type(model).__name__}: ONNX Runtime output differs from PyTorch "
                          f"by up to {err:.3g} (atol {atol}, rtol {rtol})")
    return err


def temp_onnx_path(prefix: str = "torchslim_") -> Path:
    """A fresh path in the temp dir for intermediate graphs (caller deletes it)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".onnx")
    os.close(fd)
    return Path(name)

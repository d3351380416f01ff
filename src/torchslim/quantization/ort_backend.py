"""ONNX Runtime int8: export, (optionally) fuse the graph, quantize with ORT's own tools, run.

Nothing here quantizes by hand: ``onnxruntime.quantization.quantize_dynamic`` (weights int8 per
tensor or per channel, activations quantized per batch at run time) and ``quantize_static``
(QDQ format, activation ranges calibrated on the task's data with MinMax / Percentile /
Entropy) do the work, and ``onnxruntime.transformers.optimizer`` fuses transformer blocks
(Attention, SkipLayerNorm, BiasGelu) first, which also makes the fp32 graph faster.

Layers a mixed-precision plan keeps in float are found in the graph by their weights (robust to
how an exporter names nodes) and passed as ``nodes_to_exclude``. ``OrtModel`` wraps the result
as an ``nn.Module`` so evaluate / measure treat it as any other model.

Dynamic plans may mix kernels: per-channel int8 (MatMulInteger / QAttention, the fastest) for
most layers, 8-bit weight blocks (MatMulNBits, per-block activation scales, slower but far more
faithful) only for ``block_layers``, and SmoothQuant (``smooth_alpha``, see ort_graph.py) for
the inputs whose outlier channels a per-tensor activation scale handles badly.

Choices that depend on the CPU (``reduce_range=None``) are made by isa_plan.py and recorded in
the info as ``isa_plan``: on x86 without VNNI ORT's u8s8 kernels saturate with 8-bit weights,
so weights are 7-bit there; ORT's own log messages are silenced only while ORT runs.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.bounds import bounded, check_bounds, count
from ..core.config_base import config
from ..core.errors import ConfigError, check
from ..core.selection import Layers, layers_field
from ..core.task import Task
from ..core.utils import atomic_write
from ..export.digest import stamp_onnx_bytes
from ..export.onnx import export_onnx, ort_session, spec_of, temp_onnx_path, to_feed
from ..export.outputs import OutputSpec
from .isa_plan import quiet_ort_logs, resolve_ort
from .ort_graph import (  # noqa: F401 - re-exported: tests and callers import them from here
    WEIGHT_OPS,
    act_overrides,
    activation_absmax,
    eager_attention,
    layer_nodes,
    optimize_graph,
    select_nodes,
    size_breakdown,
    smooth_graph,
    transformer_dims,
    weight_layers,
)

ORT_MODES = ("dynamic", "static")
ORT_CALIBRATIONS = ("minmax", "percentile", "entropy")


@config(renamed={"calibration_batches": "batches", "exclude_layers": "layers: {exclude: [...]}"})
class OrtQuantConfig:
    """How ONNX Runtime quantizes a graph.

    mode: "dynamic" (quantize_dynamic) or "static" (quantize_static, QDQ, calibrated).
    per_channel: weight scales per output channel.
    reduce_range: ORT's 7-bit weights (integers in [-64, 64]); None = decided by the CPU (on
        where int8 products saturate: x86 without VNNI, see isa_plan.py; off elsewhere). An
        explicit False there is honoured with one warning.
    calibration / percentile / batches: static activation ranges from the task's
        train split (val if none).
    optimize: fuse transformer blocks with onnxruntime.transformers first (needs num_heads and
        hidden_size; read from a Hugging Face ``config`` when the model has one).
    layers: the torch layers quantized (a LayerSelection on torch layer names; what it does not
        select, e.g. ``exclude``, is kept float); exclude_nodes: raw ONNX node names kept float.
    op_types: ONNX op types to quantize (None = ORT's defaults, which include Gather, i.e. the
        embedding table).
    block_bits / block_size / block_int8_compute: MatMul weights in ``block_bits``-bit blocks of
        ``block_size`` inputs (ORT MatMulNBits); with int8 compute (accuracy_level 4) activations
        are quantized per block at run time, far finer than quantize_dynamic's one scale per
        tensor (it does not saturate on AVX2 either); without it the weights are dequantized and
        the product is float (weight-only, accuracy_level 0).
        Other ops (Attention, embeddings, Conv) still go through quantize_dynamic.
    block_layers: fnmatch patterns of torch layer names (or ONNX node names) whose MatMul takes
        the blocks; the other MatMuls go through quantize_dynamic (per channel, the faster int8
        kernel). Empty = every MatMul.
    smooth_alpha / smooth_layers: SmoothQuant migration strength in (0, 1) for the inputs of
        the MatMul/Attention nodes matched by smooth_layers (empty = every one quantized with a
        per-tensor activation scale), from per-channel input maxima on ``batches`` of
        the task's data (dynamic mode; a per-channel Mul is inserted, see ort_graph.py).
    """

    mode: str = "dynamic"
    per_channel: bool = True
    reduce_range: bool | None = None
    calibration: str = "minmax"
    percentile: float = bounded(99.999, 50, 100, low_open=True)
    batches: int = count(8, 1, 100_000)
    optimize: bool = True
    layers: Layers = layers_field()
    exclude_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None
    block_bits: int | None = bounded(None, 4, 8, integer=True)
    block_size: int = count(32, 16, 256)
    block_int8_compute: bool = True
    block_layers: tuple[str, ...] = ()
    smooth_alpha: float | None = bounded(None, 0, 1, low_open=True, high_open=True)
    smooth_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bounds(self)
        self.exclude_nodes = tuple(self.exclude_nodes)
        self.block_layers, self.smooth_layers = tuple(self.block_layers), tuple(self.smooth_layers)
        check(self.mode in ORT_MODES, "OrtQuantConfig.mode", f"must be one of {ORT_MODES}, got {self.mode!r}")
        check(self.calibration in ORT_CALIBRATIONS, "OrtQuantConfig.calibration",
              f"must be one of {ORT_CALIBRATIONS} (ONNX Runtime's calibrators), got {self.calibration!r}")
        check(50 < self.percentile <= 100, "OrtQuantConfig.percentile", f"must be in (50, 100], got {self.percentile!r}")
        check(self.block_bits in (None, 4, 8), "OrtQuantConfig.block_bits", f"must be None, 4 or 8 (MatMulNBits), got {self.block_bits!r}")
        check(self.block_size in (16, 32, 64, 128, 256), "OrtQuantConfig.block_size", f"must be 16, 32, 64, 128 or 256, got {self.block_size!r}")
        check(self.block_bits is None or self.mode == "dynamic", "OrtQuantConfig.block_bits", "blockwise MatMul weights need mode='dynamic'")
        check(not self.block_layers or self.block_bits is not None, "OrtQuantConfig.block_layers",
              "selects layers for MatMulNBits blocks; set block_bits=8 (or 4) too")
        check(self.smooth_alpha is None or 0 < self.smooth_alpha < 1, "OrtQuantConfig.smooth_alpha",
              f"must be in (0, 1) or None, got {self.smooth_alpha!r}")
        check(self.smooth_alpha is None or self.mode == "dynamic", "OrtQuantConfig.smooth_alpha",
              "graph SmoothQuant is for mode='dynamic' (static QDQ takes the simulation's ranges)")
        check(self.reduce_range in (None, True, False), "OrtQuantConfig.reduce_range",
              f"must be True, False or None (by this CPU), got {self.reduce_range!r}")


class OrtModel(nn.Module):
    """An ONNX graph run by ONNX Runtime behind ``nn.Module.forward`` (tensors in and out).

    Holds the serialized graph (so the model can be saved, copied and pickled); the session is
    built lazily per process. Parameters: none, so report bytes from ``file_bytes``.
    """

    def __init__(self, onnx_bytes: bytes, input_names: list[str], threads: int | None = None, info: dict | None = None,
                 output_spec: OutputSpec | None = None):
        super().__init__()
        self.onnx_bytes, self.input_names, self.threads = onnx_bytes, list(input_names), threads
        spec = output_spec or OutputSpec()  # a tuple / dict output comes back as one
        self.output_layout, self._output_type = spec.to_dict(), spec.mapping_type  # plain data (checkpoints)
        self.info = dict(info or {})
        self._session = None

    @classmethod
    def from_file(cls, path: str | os.PathLike, threads: int | None = None) -> OrtModel:
        data = Path(path).read_bytes()
        names = [i.name for i in ort_session(data, 1).get_inputs()]
        return cls(data, names, threads)

    @property
    def session(self):
        if self._session is None:
            self._session = ort_session(self.onnx_bytes, self.threads)
        return self._session

    @property
    def file_bytes(self) -> int:
        return len(self.onnx_bytes)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        wanted = {i.name for i in self.session.get_inputs()}  # a fused graph may drop unused inputs
        given = kwargs or dict(zip(self.input_names, args))
        feed = {k: v.detach().cpu().numpy() for k, v in given.items() if k in wanted}
        device = next(iter(given.values())).device
        outs = [torch.from_numpy(o).to(device) for o in self.session.run(None, feed)]
        spec = OutputSpec.from_dict(getattr(self, "output_layout", None), getattr(self, "_output_type", None))
        return spec.rebuild(outs)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, lambda p: p.write_bytes(self.onnx_bytes))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not pickle; rebuilt on first use
        state["_output_type"] = None  # a ModelOutput class: a mapping comes back as a dict after loading
        return state

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, bytes={self.file_bytes}"


class TaskDataReader:
    """ORT CalibrationDataReader over a task's batches (train split, else val)."""

    def __init__(self, task: Task, n_batches: int, input_names: list[str]):
        split = task.train if task.train is not None else task.val
        check(split is not None, "OrtQuantConfig.mode", f"static calibration needs data but task {task.name!r} has no train or val split; use mode='dynamic'")
        self.feeds = []
        for i, (inputs, _) in enumerate(split):
            if i >= n_batches:
                break
            feed = to_feed(inputs)
            self.feeds.append({k: v for k, v in feed.items() if k in input_names})
        # ORT's calibrators stack every batch's outputs into one array: a smaller last batch
        # made that a ragged array ("inhomogeneous shape"). Keep the batches shaped like the first.
        if self.feeds:
            shape = {k: v.shape for k, v in self.feeds[0].items()}
            self.feeds = [f for f in self.feeds if {k: v.shape for k, v in f.items()} == shape]
        self._it = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


# ---------------------------------------------------------------------------- the pipeline
@dataclass
class OrtResult:
    model: OrtModel
    info: dict[str, Any] = field(default_factory=dict)


def export_fp32(model: nn.Module, example_inputs: Any, out: Path, optimize: bool = True) -> dict[str, Any]:
    """Export model (fp32) to out, fused when it is a transformer; returns what was done."""
    import copy

    dims = transformer_dims(model) if optimize else None
    m = model
    if dims is not None:
        m = copy.deepcopy(model)
        eager_attention(m)
    raw = temp_onnx_path()
    try:
        export_onnx(m, example_inputs, raw)
        fused = optimize_graph(raw, dims, out)
    finally:
        raw.unlink(missing_ok=True)
    return {"fused_ops": fused, "optimized": dims is not None}


def quantize_onnx(fp32_path: Path, out: Path, cfg: OrtQuantConfig, model: nn.Module | None = None,
                  task: Task | None = None) -> dict[str, Any]:
    """Quantize the graph at fp32_path into out with ORT; returns excluded nodes etc."""
    if cfg.reduce_range is None:  # ort_quantize resolves it first; a direct call gets the same choice
        cfg = resolve_ort(cfg)[0]
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod

    mapping, layers = (layer_nodes(fp32_path, model), weight_layers(model)) if model is not None else ({}, {})
    kept = [n for n in mapping if not cfg.layers.matches(n, layers[n])]  # float: not selected by layers
    missing = [p for p in cfg.layers.exclude if not any(fnmatch.fnmatchcase(n, p) for n in mapping)]  # recorded
    exclude = sorted({n for layer in kept for n in mapping[layer]} | set(cfg.exclude_nodes))
    # quantize_dynamic first rewrites Gemm as MatMul + Add named "<gemm>_MatMul"; exclude that too
    ort_exclude = exclude + [f"{n}_MatMul" for n in exclude]
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # fused contrib ops defeat type inference
    common = {"per_channel": cfg.per_channel, "reduce_range": cfg.reduce_range, "nodes_to_exclude": ort_exclude,
              "op_types_to_quantize": list(cfg.op_types) if cfg.op_types else None}
    info: dict[str, Any] = {}
    if cfg.mode == "dynamic":
        _dynamic(fp32_path, out, cfg, mapping, ort_exclude, task, info, extra, common)
    else:
        check(task is not None, "OrtQuantConfig.mode", "static quantization needs a task with calibration data")
        names = [i.name for i in onnx.load(str(fp32_path)).graph.input]
        reader = TaskDataReader(task, cfg.batches, names)
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[cfg.calibration]
        if cfg.calibration == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        overrides = act_overrides(model, mapping, onnx.load(str(fp32_path)).graph) if model is not None else {}
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        try:
            quantize_static(str(fp32_path), str(out), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                            extra_options=extra, **common)
        except (ValueError, KeyError, RuntimeError) as exc:  # ORT's own errors on this graph: one line
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"QuantConfig.mode='static': ONNX Runtime's static quantization failed on this "
                              f"graph ({first}); use mode='dynamic'") from None
    return {"excluded_nodes": exclude, "excluded_layers_not_found": missing, "matched_layers": len(mapping),
            "quantized_nodes": _count_quantized(out), **info,
            "activation_ranges_from_simulation": len(extra.get("TensorQuantOverrides", {}))}


def _dynamic(src: Path, out: Path, cfg: OrtQuantConfig, mapping: dict[str, list[str]], exclude: list[str],
             task: Task | None, info: dict[str, Any], extra: dict, common: dict) -> None:
    """quantize_dynamic, optionally after SmoothQuant, with MatMulNBits for the block nodes."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src)).graph
    block = []
    if cfg.block_bits and cfg.block_layers:
        block = [n.name for n in graph.node if n.op_type == "MatMul" and n.name in
                 set(select_nodes(cfg.block_layers, mapping, graph)) - set(exclude)]
        info["block_nodes"] = block
    elif cfg.block_bits:  # every MatMul in blocks; quantize_dynamic only takes the other ops
        common["op_types_to_quantize"] = [t for t in (cfg.op_types or NON_MATMUL_OPS) if t != "MatMul"]
        block = [n.name for n in graph.node if n.op_type == "MatMul"]
    tmp = [out.with_name(out.stem + ".smooth.onnx"), out.with_name(out.stem + ".dyn.onnx")]
    try:
        if cfg.smooth_alpha is not None:
            info["smoothed_nodes"] = _smooth(src, tmp[0], cfg, mapping, set(exclude) | set(block), task, graph)
            src = tmp[0]
        if not cfg.block_bits:
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, extra_options=extra, **common)
            return
        common["nodes_to_exclude"] = exclude + block
        quantize_dynamic(str(src), str(tmp[1]), weight_type=QuantType.QInt8, extra_options=extra, **common)
        _matmul_nbits(tmp[1], out, cfg, exclude)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)


def _smooth(src: Path, out: Path, cfg: OrtQuantConfig, mapping: dict[str, list[str]], skip: set[str],
            task: Task | None, graph) -> dict[str, float]:
    """SmoothQuant the selected nodes' inputs, ranges from the task's calibration batches."""
    check(task is not None, "OrtQuantConfig.smooth_alpha", "SmoothQuant needs a task with calibration data")
    if cfg.smooth_layers:
        nodes = select_nodes(cfg.smooth_layers, mapping, graph)
    else:
        nodes = [n.name for n in graph.node if n.op_type in ("MatMul", "Attention")]
    nodes = [n for n in nodes if n not in skip]
    names = [i.name for i in graph.input]
    amax = activation_absmax(src, nodes, TaskDataReader(task, cfg.batches, names).feeds)
    return smooth_graph(src, out, amax, cfg.smooth_alpha, nodes)


NON_MATMUL_OPS = ("Attention", "EmbedLayerNormalization", "Gather", "Conv", "Gemm")


def _matmul_nbits(src: Path, out: Path, cfg: OrtQuantConfig, exclude: list[str]) -> None:
    """MatMul weights -> MatMulNBits blocks with ORT's own quantizer (symmetric per block)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=cfg.block_bits, block_size=cfg.block_size, is_symmetric=True,
                             accuracy_level=4 if cfg.block_int8_compute else 0, nodes_to_exclude=exclude)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)


def _count_quantized(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearMatMul", "QLinearConv",
                            "ConvInteger", "DequantizeLinear", "QGemm", "QEmbedLayerNormalization", "MatMulNBits"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def ort_quantize(model: nn.Module, example_inputs: Any, cfg: OrtQuantConfig | None = None,
                 task: Task | None = None, threads: int | None = None) -> OrtResult:
    """Export model, fuse, quantize with ORT; return it as an OrtModel plus what was done.

    model may be a simulated (fake-quant) model: its float weights are exported and its static
    activation ranges are handed to ORT."""
    from .torchao_backend import defake

    cfg, plan = resolve_ort(cfg or OrtQuantConfig())
    spec = spec_of(model, example_inputs)
    fp32, q = temp_onnx_path(), temp_onnx_path()
    try:
        with quiet_ort_logs():
            info = export_fp32(defake(model), example_inputs, fp32, cfg.optimize)
            info["fp32_onnx_bytes"] = fp32.stat().st_size
            info.update(quantize_onnx(fp32, q, cfg, model, task))
        data = stamp_onnx_bytes(q.read_bytes())
    finally:
        fp32.unlink(missing_ok=True)
        q.unlink(missing_ok=True)
    names = list(example_inputs) if isinstance(example_inputs, Mapping) else ["input"]
    info.update(backend="onnxruntime", mode=cfg.mode, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                isa_plan=plan, onnx_bytes=len(data))
    if spec.dropped:
        info["outputs_dropped"] = spec.dropped
    info["size"] = sizes = size_breakdown(data)
    if sizes["graph_bytes"] > sizes["tensor_bytes"] and info["fp32_onnx_bytes"] < 1.5 * len(data):
        warnings.warn(f"ONNX Runtime int8: the file is {len(data):,} bytes against {info['fp32_onnx_bytes']:,} in fp32; "
                      f"its weights are only {sizes['tensor_bytes']:,} bytes, the rest is graph structure "
                      "(node and tensor names), which int8 cannot shrink (a model this small)", stacklevel=2)
    return OrtResult(OrtModel(data, names, threads, info, spec), info)


def ort_fp32(model: nn.Module, example_inputs: Any, optimize: bool = True, threads: int | None = None) -> OrtModel:
    """The float model as an ONNX Runtime graph (the fair fp32 baseline for ORT int8)."""
    out, spec = temp_onnx_path(), spec_of(model, example_inputs)
    try:
        with quiet_ort_logs():
            info = export_fp32(model, example_inputs, out, optimize)
        data = stamp_onnx_bytes(out.read_bytes())
    finally:
        out.unlink(missing_ok=True)
    names = list(example_inputs) if isinstance(example_inputs, Mapping) else ["input"]
    return OrtModel(data, names, threads, info, spec)


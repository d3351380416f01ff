"""What one forward costs: MACs (counted) and latency (timed, interleaved); peak memory is in
``measure_memory``.

Shared machines are noisy, so candidates are never timed one after the other: every repeat
runs each candidate once (in a rotating order), and we report medians and percentiles.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from ..errors import check
from ..task import call_model
from ..utils import eval_mode, removing

log = logging.getLogger(__name__)
MIN_SAMPLE_S = 1e-3  # calls faster than this are looped so one sample spans >= 1 ms


# ---------------------------------------------------------------------------- MACs
_MATMUL_LIKE = re.compile(r"mm|matmul|linear|conv|gemm|einsum|attention")


def _register_cpu_sdpa() -> None:
    """torch's counter has the SDPA formula for the CUDA kernels only; the CPU flash kernel
    does the same two batched matmuls, so give it the same formula."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    cuda_op = torch.ops.aten._scaled_dot_product_flash_attention
    if op is not None and op not in flop_registry and cuda_op in flop_registry:
        register_flop_formula(op, get_raw=True)(flop_registry[cuda_op])


_register_cpu_sdpa()


class _OpRecorder(TorchDispatchMode):
    """Records every aten op seen, to name the matmul-like ones FlopCounterMode cannot count."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def _is_shape_leaf(m: nn.Module) -> bool:
    linear = hasattr(m, "in_features") and hasattr(m, "out_features")
    return linear or (hasattr(m, "in_channels") and hasattr(m, "kernel_size")) or isinstance(m, nn.RNNBase)


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _rnn_macs(m: nn.RNNBase, args: tuple) -> int:
    """Closed form for torch's recurrent layers (their fused aten kernels have no FLOP formula):
    per time step, layer and direction, gates x hidden x (layer input + hidden) MACs (plus the
    LSTM projection when proj_size > 0)."""
    x = args[0]
    if not isinstance(x, torch.Tensor):  # a PackedSequence: its data holds every real step
        x = x.data
        steps_x_batch = x.shape[0]
    else:
        steps_x_batch = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    gates, dirs = _GATES.get(m.mode, 1), 2 if m.bidirectional else 1
    out_h = m.proj_size or m.hidden_size
    total = 0
    for layer in range(m.num_layers):
        width = m.input_size if layer == 0 else out_h * dirs
        per_step = gates * m.hidden_size * (width + out_h) + (m.hidden_size * m.proj_size if m.proj_size else 0)
        total += dirs * per_step
    return steps_x_batch * total


def _shape_macs(m: nn.Module, args: tuple, out: Any) -> int:
    """MACs of a Linear/Conv (or recurrent layer) call from its shapes alone (the float
    model's count)."""
    if isinstance(m, nn.RNNBase):
        return _rnn_macs(m, args)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return 0
    if hasattr(m, "in_features"):
        return out.numel() * int(m.in_features)
    k = math.prod(m.kernel_size) if isinstance(m.kernel_size, (tuple, list)) else int(m.kernel_size)
    groups = int(getattr(m, "groups", 1))
    if getattr(m, "transposed", False):  # each input element meets C_out/groups * k weights
        return args[0].numel() * (int(m.out_channels) // groups) * k
    return out.numel() * (int(m.in_channels) // groups) * k


def _shape_hooks(model: nn.Module, counter: FlopCounterMode | None, found: dict[str, int]):
    """Hooks on innermost Linear/Conv-like modules; a call the counter saw no FLOPs for (or
    every call, without counter) is counted from shapes into found[name]."""
    leaves = [
        (n, m)
        for n, m in model.named_modules()
        if _is_shape_leaf(m) and not any(_is_shape_leaf(c) for c in list(m.modules())[1:])
    ]
    handles, before = [], {}
    for name, mod in leaves:

        def pre(m, args, name=name):
            before[name] = counter.get_total_flops() if counter is not None else 0

        def post(m, args, out, name=name):
            if counter is None or counter.get_total_flops() == before[name]:
                found[name] = found.get(name, 0) + _shape_macs(m, args, out)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


@contextmanager
def _mha_fastpath_off():
    """nn.MultiheadAttention / TransformerEncoderLayer take a fused "fast path" in eval mode
    without grad, whose kernels the counter cannot see; MACs are counted with it off (same math)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    fastpath = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(fastpath)


def count_macs_detail(model: nn.Module, inputs: Any) -> tuple[int, list[str]]:
    """(MACs of one forward on inputs, notes on anything not counted exactly).

    MACs = FlopCounterMode FLOPs / 2: matmul, conv and attention only (BatchNorm, activations,
    pooling and element-wise ops are left out, as in the usual MAC counts of papers). Linear/Conv calls it counts nothing for (e.g. int8 kernels without a formula,
    torch.ao packed modules) are counted from their float shapes instead. If the counter fails
    outright, every Linear/Conv is counted from shapes and other matmuls are missed (noted).
    """
    with eval_mode(model), _mha_fastpath_off():
        try:
            flops, found, notes = _count_with_counter(model, inputs)
        except Exception as exc:  # noqa: BLE001 - count what we can rather than fail the row
            flops, found = 0, _run_with_hooks(model, inputs, None)
            why = f"{type(exc).__name__}: {exc}"
            notes = [f"MACs: counter failed ({why}); only Linear/Conv counted, from shapes"]
    for note in notes:
        log.info(note)
    return int(flops) // 2 + sum(found.values()), notes


def _run_with_hooks(
    model: nn.Module, inputs: Any, counter: FlopCounterMode | None, *modes
) -> dict[str, int]:
    found: dict[str, int] = {}
    handles = _shape_hooks(model, counter, found)
    with removing(handles), torch.no_grad(), contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        call_model(model, inputs)
    return found


def _count_with_counter(model: nn.Module, inputs: Any) -> tuple[int, dict[str, int], list[str]]:
    counter, rec = FlopCounterMode(display=False), _OpRecorder()
    found = _run_with_hooks(model, inputs, counter, counter, rec)
    notes = []
    missed = sorted(
        str(op) for op in rec.ops if op not in flop_registry and _MATMUL_LIKE.search(str(op))
    )
    if missed:
        notes.append(f"MACs: no FLOP formula for {missed}")
    if found:
        notes.append(f"MACs: {sorted(found)} counted from float shapes (no countable op seen)")
    return counter.get_total_flops(), found, notes


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward of the given batch (see count_macs_detail)."""
    return count_macs_detail(model, inputs)[0]


@contextmanager
def torch_threads(threads: int | None):
    """Set torch's intra-op thread count for the block and restore it afterwards."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], Any], number: int) -> float:
    """Seconds per call of fn, averaged over ``number`` back-to-back calls."""
    _sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync()
    return (time.perf_counter() - start) / number


def compare_latency(
    candidates: Mapping[str, Callable[[], Any]],
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """Time zero-argument callables side by side: ``{name: {median_ms, p10_ms, p90_ms, ...}}``.

    Hand-written rather than ``torch.utils.benchmark.Timer``: Timer measures one statement at a
    time, while a fair ratio on a shared machine needs the candidates interleaved round-robin
    inside each repeat so that load spikes hit all of them alike.
    """
    check(len(candidates) > 0, "compare_latency.candidates", "give at least one callable")
    check(warmup >= 0, "compare_latency.warmup", f"must be >= 0, got {warmup}")
    check(repeats >= 1, "compare_latency.repeats", f"must be >= 1, got {repeats}")
    names = list(candidates)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                candidates[n]()
        # one extra timed call each picks how many calls make up one sample (>= MIN_SAMPLE_S)
        number = {
            n: max(1, math.ceil(MIN_SAMPLE_S / max(_time_once(candidates[n], 1), 1e-9)))
            for n in names
        }
        used_threads = torch.get_num_threads()
        probe = _LoadProbe()
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:  # rotate so no candidate always runs first
                samples[n].append(_time_once(candidates[n], number[n]))
        load = probe.stop(used_threads)
    return {n: {**_summary(samples[n], number[n]), "load": load} for n in names}


def _system_busy_s() -> float | None:
    """CPU seconds all processes have been busy since boot (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _LoadProbe:
    """How much CPU this process got while timing, and how much went elsewhere.

    cpu_share: CPU time of the timing thread / wall, capped at 1. The calling thread runs the
    forward (torch's and ONNX Runtime's pools spin-wait on it between kernels), so well below 1
    means it was runnable but descheduled: another process held its core. extra_cores: process
    CPU beyond what its timing threads can use (a busy thread of this process). other_cores:
    what other processes used, from /proc/stat (10 ms resolution: only windows >= 0.5 s).
    """

    def __init__(self) -> None:
        self.wall, self.cpu, self.sys = time.perf_counter(), time.process_time(), _system_busy_s()
        self.thread = time.thread_time()

    def stop(self, threads: int) -> dict[str, float | int | None]:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        cpu = time.process_time() - self.cpu
        mine = time.thread_time() - self.thread
        busy = _system_busy_s()
        cores = os.cpu_count() or 1
        usable = wall * min(threads, cores)
        other = None
        if busy is not None and self.sys is not None and wall >= 0.5:
            other = max(0.0, (busy - self.sys) - cpu) / wall
        return {"wall_s": round(wall, 4), "threads": threads, "cores": cores,
                "cpu_share": round(min(mine / wall, 1.0), 3),
                "extra_cores": round(max(0.0, cpu - usable) / wall, 3),
                "other_cores": None if other is None else round(other, 3)}


def _summary(seconds: list[float], number: int) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "repeats": len(seconds),
        "calls_per_sample": number,
    }


def latency(
    fn_or_model: Callable[..., Any] | nn.Module,
    inputs: Any = None,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
) -> dict[str, float]:
    """Latency of one callable: a model called on ``inputs``, or a zero-argument function."""
    if isinstance(fn_or_model, nn.Module):
        model = fn_or_model
        check(inputs is not None, "latency.inputs", "a model needs example inputs")
        fn = lambda: call_model(model, inputs)
    elif inputs is not None:
        fn = lambda: fn_or_model(inputs)
    else:
        fn = fn_or_model
    return compare_latency({"fn": fn}, warmup=warmup, repeats=repeats, threads=threads)["fn"]


# ---------------------------------------------------------------------------- ONNX Runtime
def ort_session(
    onnx_path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None
):
    """An onnxruntime InferenceSession with ``threads`` intra-op threads (None = ORT default)."""
    import onnxruntime as ort

    check(os.path.isfile(onnx_path), "MeasureConfig.onnx_path", f"no such file {str(onnx_path)!r}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(onnx_path), opts, providers=providers or ["CPUExecutionProvider"]
    )


def ort_feeds(session, inputs: Any) -> dict[str, np.ndarray]:
    """Numpy feeds for session from a torch batch (Tensor -> first input; dict -> by name)."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        return {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names}
    if isinstance(inputs, (tuple, list)):
        return {n: v.detach().cpu().numpy() for n, v in zip(names, inputs)}
    return {names[0]: inputs.detach().cpu().numpy()}


def ort_runner(
    onnx_path: str | os.PathLike, inputs: Any, threads: int | None = None
) -> Callable[[], Any]:
    """A zero-argument callable running the ONNX model on inputs (for compare_latency)."""
    session = ort_session(onnx_path, threads)
    feeds = ort_feeds(session, inputs)
    return lambda: session.run(None, feeds)


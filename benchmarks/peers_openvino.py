"""OpenVINO peers for the benchmarks: fp32 (``openvino.convert_model``) and int8 (NNCF PTQ).

Both start from the same plain ONNX export torchslim verifies against PyTorch (``export_onnx``:
dynamic batch and sequence, no ORT contrib ops, so OpenVINO reads it and does its own fusion).
The int8 arm is ``nncf.quantize`` (post-training, static activation ranges from calibration
batches, ``model_type=nncf.ModelType.TRANSFORMER``, NNCF's other defaults). Models are compiled
for CPU with ``INFERENCE_NUM_THREADS`` = the benchmark's thread count and an explicit f32
inference precision (OpenVINO would pick bf16 on AMX / AVX-512-BF16 machines: not fp32).

Everything optional: ``unavailable()`` gives the reason the peers cannot run (never raises), and
``build_peers`` returns ``(candidates, skipped)`` where a failure becomes a skip reason.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

NAMES = ("openvino_fp32", "openvino_int8")


def unavailable() -> str | None:
    """Why the OpenVINO peers cannot run here (a one-line reason), or None when they can."""
    try:
        import openvino  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing or broken install: a reason, not a crash
        return f"openvino is not importable ({type(exc).__name__}: {exc}); pip install 'torchslim[bench]'"
    return None


def versions() -> dict[str, str]:
    out = {}
    for mod in ("openvino", "nncf"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "not installed"
    return out


def _saved_bytes(ov_model: Any) -> int:
    """Bytes of the IR (.xml + .bin) ``openvino.save_model`` writes, weights kept as they are."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        return sum(p.stat().st_size for p in Path(d).iterdir())


class OvModel(nn.Module):
    """An OpenVINO model compiled for CPU behind ``nn.Module.forward`` (tensors in and out).

    Keeps the uncompiled ``openvino.Model`` so the same model can be recompiled for another
    thread count (``with_threads``); compiled lazily, one infer request reused across calls.
    """

    def __init__(self, ov_model: Any, threads: int, file_bytes: int, info: dict | None = None):
        super().__init__()
        self.ov_model, self.threads, self.file_bytes = ov_model, int(threads), int(file_bytes)
        self.info = dict(info or {})
        self._request = None
        self._inputs: list[str] = []

    def config(self) -> dict[str, str]:
        return {"INFERENCE_NUM_THREADS": str(self.threads), "INFERENCE_PRECISION_HINT": "f32",
                "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}

    def _compiled(self):
        if self._request is None:
            import openvino as ov

            compiled = ov.Core().compile_model(self.ov_model, "CPU", self.config())
            self._inputs = [port.get_any_name() for port in compiled.inputs]
            self._request = compiled.create_infer_request()
        return self._request

    def with_threads(self, threads: int) -> OvModel:
        return OvModel(self.ov_model, threads, self.file_bytes, self.info)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        request = self._compiled()
        given = kwargs or dict(zip(self._inputs, args))  # positional: in the graph's input order
        feed = {k: v.detach().cpu().numpy() for k, v in given.items() if k in self._inputs}
        out = request.infer(feed)
        device = next(iter(given.values())).device
        return torch.from_numpy(out[0].copy()).to(device)

    def __getstate__(self) -> dict:
        raise TypeError("OvModel does not pickle; save the IR with openvino.save_model(model.ov_model, ...)")

    def extra_repr(self) -> str:
        return f"threads={self.threads}, bytes={self.file_bytes}"


def _feeds(task: Any, names: set[str]) -> list[dict[str, Any]]:
    """The calibration batches (train split, else val) as numpy feeds for the graph's inputs."""
    split = task.train if task.train is not None else task.val
    if split is None:
        raise ValueError(f"task {task.name!r} has no train or val split to calibrate on")
    feeds = []
    for inputs, _ in split:
        items = inputs.items() if isinstance(inputs, Mapping) else [("input", inputs)]
        feeds.append({k: v.numpy() for k, v in items if k in names})
    return feeds


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


def build_peers(model: nn.Module, task: Any, threads: int) -> tuple[dict[str, tuple], dict[str, str]]:
    """``({name: (OvModel, seconds to build, file bytes, note)}, {name: skip reason})``.

    The fp32 build time covers the ONNX export and the conversion; the int8 time covers the
    conversion and ``nncf.quantize`` (the export is shared and not counted twice).
    """
    reason = unavailable()
    if reason is not None:
        return {}, dict.fromkeys(NAMES, reason)
    import openvino as ov

    from torchslim.export.onnx import export_onnx

    out: dict[str, tuple] = {}
    skipped: dict[str, str] = {}
    ex = task.example_inputs()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        try:
            start = time.perf_counter()
            export_onnx(model, ex, path)
            export_s = time.perf_counter() - start
            start = time.perf_counter()
            fp32 = ov.convert_model(str(path))
            convert_s = time.perf_counter() - start
            nbytes = _saved_bytes(fp32)
            out["openvino_fp32"] = (OvModel(fp32, threads, nbytes), export_s + convert_s, nbytes,
                                    (f"openvino {ov.__version__} convert_model(plain ONNX export), CPU f32, "
                                    f"INFERENCE_NUM_THREADS={threads}"))
        except Exception as exc:  # noqa: BLE001 - a failed peer is recorded, the benchmark goes on
            return {}, dict.fromkeys(NAMES, f"export/convert failed: {_reason(exc)}")
        try:
            import nncf

            nncf.set_log_level(logging.ERROR)
            start = time.perf_counter()
            base = ov.convert_model(str(path))  # quantize a fresh copy: nncf may edit its input
            names = {n for port in base.inputs for n in port.get_names()}
            feeds = _feeds(task, names)
            q = nncf.quantize(base, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(feeds))  # counts dataset items: our batches
            secs = time.perf_counter() - start
            nbytes = _saved_bytes(q)
            out["openvino_int8"] = (OvModel(q, threads, nbytes), secs, nbytes,
                                    (f"nncf {nncf.__version__} quantize(model_type=TRANSFORMER, defaults) on "
                                    f"{len(feeds)} calibration batches; OpenVINO CPU, INFERENCE_NUM_THREADS={threads}"))
        except Exception as exc:  # noqa: BLE001
            skipped["openvino_int8"] = f"nncf.quantize failed: {_reason(exc)}"
    return out, skipped

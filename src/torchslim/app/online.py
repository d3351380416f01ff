"""``torchslim online recipe.yaml``: compress a model as a recipe says, then let it keep learning
from a stream (prequential), writing run.json, the model and checkpoints into the out folder.

An online recipe is an ordinary recipe (task, model, seed, train, stages, ...: compressed by
the runner into ``<out>/compress``, with its own checkpoints and resume) plus::

    stream:                      # the batches to learn from, in order
      batch_size: 32
      segments:                  # one after another (a drift between two of them, say)
        - {source: task, split: val}                       # a split of the recipe's task
        - {source: task, split: train, permute_labels: [3, 7, 1, 9, 0, 2, 8, 4, 6, 5]}
        - {source: folder, path: incoming/, pattern: "*.npz", idle_timeout: 30}
        - {source: npz, path: more.npz, x_key: x, y_key: y}
    eval:                        # optional held-out sets scored over time (forgetting)
      old: {source: task, split: test}
    online: {lr: 0.01, detector: adwin, checkpoint_every: 20}   # OnlineConfig fields
    # online.teacher: "baseline" or a model spec {name, weights, kwargs}: distill from it for
    # teacher_batches batches after each drift

``<out>/run.json`` gets the compression rows, the prequential curve (per batch), drift events,
held-out scores and the compression check; ``--resume`` continues a killed run at the next
unseen batch (the online checkpoint is ``<out>/.state/online/online.pt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import TorchslimError
from ..core.utils import atomic_write_text
from ..online import ArrayStream, Concat, FolderStream, OnlineConfig, online
from .recipe import RecipeError, build_dataclass, pydantic_message, read_recipe_file
from .run_state import clean_outputs, folder_lock, sweep_temp_files


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    source: Literal["task", "folder", "npz"]
    split: Literal["train", "val", "test"] = "val"
    path: str | None = None
    pattern: str = "*.npz"
    x_key: str = "x"
    y_key: str = "y"
    idle_timeout: float | None = Field(5.0, ge=0.0, le=86_400.0)
    end_marker: str = "END"
    permute_labels: list[int] | None = None
    rotate90: int = Field(0, ge=0, le=3)  # square image inputs turned by 90 degrees this many times


class StreamSpec(_Strict):
    batch_size: int = Field(32, ge=1, le=65_536, strict=True)
    segments: list[SourceSpec] = Field(min_length=1, max_length=1000)
    # a fake-quant model learns through its quantizers; at every checkpoint (and at the end) a
    # copy is converted to this real int8 backend and written to artifacts/ (null: not exported)
    export: Literal["onnxruntime", "torchao"] | None = None


class OnlineRecipe(_Strict):
    stream: StreamSpec
    eval: dict[str, SourceSpec] = {}
    online: dict[str, Any] = {}


def read_online_recipe(path: str | Path) -> tuple[dict[str, Any], OnlineRecipe, OnlineConfig]:
    """(the compression recipe as a dict, the stream/eval spec, the OnlineConfig), all validated
    before any work; errors are one RecipeError line naming the path in the recipe."""
    data = read_recipe_file(path)
    if not isinstance(data, dict) or "stream" not in data:
        raise RecipeError("recipe: an online recipe needs a `stream` block (see docs/online.md)")
    extra = {k: data.pop(k) for k in ("stream", "eval", "online") if k in data}
    try:
        spec = OnlineRecipe.model_validate(extra)
    except ValidationError as exc:
        raise RecipeError(pydantic_message(exc)) from None
    for where, s in [*((f"stream.segments[{i}]", s) for i, s in enumerate(spec.stream.segments)),
                     *((f"eval.{k}", s) for k, s in spec.eval.items())]:
        if s.source != "task" and not s.path:
            raise RecipeError(f"{where}.path: source {s.source!r} needs a path")
        if s.permute_labels is not None and sorted(s.permute_labels) != list(range(len(s.permute_labels))):
            raise RecipeError(f"{where}.permute_labels: must be a permutation of 0..n-1, got {s.permute_labels}")
    _check_teacher(spec.online.get("teacher"))
    cfg = build_dataclass(OnlineConfig, {k: v for k, v in spec.online.items() if k != "teacher"}, "online")
    return data, spec, cfg


def _check_teacher(t: Any) -> None:
    """online.teacher in a recipe: "baseline" (the recipe's uncompressed model after its baseline
    training) or a model spec {name, weights, kwargs} (weights: a safetensors file)."""
    from .recipe import ModelSpec

    if t is None or t == "baseline":
        return
    if not isinstance(t, dict):
        raise RecipeError(f"online.teacher: use 'baseline' or a model spec {{name: ..., weights: ...}}, got {t!r}")
    try:
        ModelSpec.model_validate(t)
    except ValidationError as exc:
        raise RecipeError("online.teacher." + pydantic_message(exc)) from None


def _teacher(t: Any, task, out: Path, trust_code: bool):
    """The teacher module a recipe names (see _check_teacher); None when it names none."""
    from ..zoo import MODELS, build_model
    from .checkpoint import load_module
    from .recipe import ModelSpec

    if t is None:
        return None
    if t == "baseline":
        return load_module(out / "compress" / ".state" / "baseline.pt").eval()
    spec = ModelSpec.model_validate(t)
    if spec.name not in MODELS and not trust_code:
        raise TorchslimError(f"online.teacher.name: {spec.name!r} is not a built-in model; pass --trust-code to import it")
    model = build_model(spec.name, task, **spec.kwargs)
    if spec.weights:
        from ..export.rebuild import load

        load(spec.weights, model)  # safetensors / weights_only: nothing unpickled
    return model.eval()


def _transform(x: torch.Tensor, y: torch.Tensor, s: SourceSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if s.permute_labels is not None:
        perm = torch.tensor(s.permute_labels)
        if int(y.max()) >= len(perm):
            raise TorchslimError(f"permute_labels has {len(perm)} entries but the labels reach {int(y.max())}")
        y = perm[y]
    if s.rotate90:
        side = round(x[0].numel() ** 0.5)
        if side * side != x[0].numel():
            raise TorchslimError(f"rotate90 needs square image inputs; a sample has {x[0].numel()} values")
        x = torch.rot90(x.reshape(len(x), side, side), s.rotate90, (1, 2)).reshape(x.shape)
    return x, y


def _arrays(task, s: SourceSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if s.source == "task":
        xs, ys = zip(*task.split(s.split))  # one pass: inputs and labels from the same shuffle
        return _transform(torch.cat(xs), torch.cat(ys), s)
    with np.load(s.path, allow_pickle=False) as f:
        return _transform(torch.as_tensor(f[s.x_key], dtype=torch.float32), torch.as_tensor(f[s.y_key]), s)


def build_stream(task, spec: StreamSpec) -> Concat:
    parts = []
    for s in spec.segments:
        if s.source == "folder":
            if s.permute_labels or s.rotate90:
                raise TorchslimError("permute_labels/rotate90 apply to task and npz sources, not folders")
            parts.append(FolderStream(s.path, s.pattern, s.x_key, s.y_key, spec.batch_size, idle_timeout=s.idle_timeout,
                                      end_marker=s.end_marker))
        else:
            parts.append(ArrayStream(*_arrays(task, s), spec.batch_size))
    return Concat(*parts)


def _compressed_model(recipe: dict[str, Any], out_dir: Path, resume: bool, trust_code: bool, log) -> tuple[Any, Any, dict]:
    from ..zoo import build_task
    from .checkpoint import load_module
    from .recipe import load_recipe
    from .runner import run_recipe

    parsed = load_recipe(recipe)
    summary = run_recipe(parsed, out=out_dir / "compress", resume=resume, log=log, trust_code=trust_code)
    n = len(parsed.stages)
    state = out_dir / "compress" / ".state"
    model = load_module(state / ("baseline.pt" if n == 0 else f"stage-{n}.pt"))
    task = build_task(parsed.task.name, **parsed.task.kwargs)
    return model, task, summary


def _exporter(backend: str, task, out: Path, records: list[dict[str, Any]], log):
    """on_checkpoint for online(): convert a copy of the fake-quant model to ``backend`` (its plan
    is the model's own FakeQuantLayers: bits, or float where disabled) and write it under
    artifacts/, recording its bytes and how often its predictions agree with the fake-quant
    model's on the task's test split."""
    import copy
    import dataclasses

    from ..quantization.convert import convert
    from ..quantization.fake import FakeQuantLayer
    from ..quantization.mixed import LayerChoice

    def export(model, offset: int) -> None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)}
        if not layers:
            raise TorchslimError(f"stream.export: {backend!r} needs a quantized (fake-quant) model; the recipe's "
                                 "stages have no quantize stage with backend 'simulate'")
        cfg = dataclasses.replace(getattr(model, "quant_config", None) or _quant_config(model), backend=backend)
        plan = [LayerChoice(n, m.wq.bits if getattr(m, "enabled", True) else None) for n, m in layers.items()]
        sim = copy.deepcopy(model).eval()
        res = convert(sim, plan, cfg, task)
        suffix = ".onnx" if backend == "onnxruntime" else ".pt"
        path = out / "artifacts" / f"online-{offset:06d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        res.save(res.model, str(path))
        agree = _agreement(sim, res.model, task)
        records.append({"batch": offset, "backend": backend, "path": str(path.relative_to(out)),
                        "bytes": path.stat().st_size, "agreement_with_fake_quant": agree})
        log(f"[online] batch {offset}: exported {backend} int8 ({path.stat().st_size:,} bytes, "
            f"{agree:.4f} of test predictions equal to the fake-quant model's)")

    return export


def _quant_config(model):
    """The QuantConfig the fake-quant layers were made with (bits and schemes read back)."""
    from ..quantization.config import QuantConfig
    from ..quantization.fake import FakeQuantLayer

    first = next(m for m in model.modules() if isinstance(m, FakeQuantLayer))
    mode = "weights_only" if first.aq is None else ("dynamic" if first.aq.dynamic else "static")
    return QuantConfig(bits=first.wq.bits, mode=mode)


@torch.no_grad()
def _agreement(a, b, task) -> float:
    from ..core.task import as_tensor, call_model

    same = total = 0
    for x, _ in task.split("test"):
        pa = as_tensor(call_model(a, x)).argmax(-1)
        pb = as_tensor(call_model(b, x)).argmax(-1)
        same, total = same + int((pa == pb).sum()), total + len(pa)
    return same / max(total, 1)


def run_online_recipe(path: str | Path, out_dir: str | Path | None = None, resume: bool = False,
                      trust_code: bool = False, log=print) -> int:
    """Run an online recipe (module doc); 0 on success, 2 with one line on bad input."""
    try:
        recipe, spec, cfg = read_online_recipe(path)
        if spec.stream.export:  # before any work: exporting needs a fake-quant model to learn with
            quant = [st["quantize"] for st in recipe.get("stages", []) if isinstance(st, dict) and "quantize" in st]
            if not quant or (quant[-1] or {}).get("backend", "simulate") != "simulate":
                raise TorchslimError(f"stream.export: {spec.stream.export!r} needs a quantize stage with backend "
                                     "'simulate' (the model learns through fake-quant and is exported at checkpoints)")
        out = Path(out_dir or recipe.get("out") or "out")
        with folder_lock(out):
            sweep_temp_files(out)
            ckpt = out / ".state" / "online"
            if not resume:
                clean_outputs(out)
            model, task, summary = _compressed_model(recipe, out, resume, trust_code, log)
            teacher = _teacher(spec.online.get("teacher"), task, out, trust_code)
            if teacher is not None:
                import dataclasses

                cfg = dataclasses.replace(cfg, teacher=teacher)
            sets = {k: _arrays(task, s) for k, s in spec.eval.items() if s.source != "folder"}
            exports: list[dict[str, Any]] = []
            hook = _exporter(spec.stream.export, task, out, exports, log) if spec.stream.export else None
            result = online(model, build_stream(task, spec.stream), cfg, loss=task.loss, eval_sets=sets,
                            checkpoint_dir=ckpt, resume=resume, on_checkpoint=hook)
            from ..export.weights import save_weights

            save_weights(model, out / "model.safetensors")
            run = {"kind": "online", "recipe": str(path), "compression": summary, "online_config": cfg.to_dict(),
                   "online": result.to_dict(), "files": {"model": "model.safetensors"}, "exports": exports}
            atomic_write_text(out / "run.json", json.dumps(run, indent=2, default=str))
            log(f"online: {result.batches} batches, {result.samples} samples, prequential accuracy "
                f"{result.prequential_accuracy:.4f}, {result.samples_per_s:,.0f} samples/s, "
                f"{len(result.drift_events)} drift event(s), compression unchanged: {result.compression_unchanged}")
            return 0
    except TorchslimError as exc:
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2

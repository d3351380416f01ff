"""Run a recipe: baseline -> stage 1 -> measure -> stage 2 -> measure -> ... -> exports, run.json.

After every stage the model is checkpointed (atomically) under ``<out>/.state/`` together with
the rows so far, so ``resume=True`` restarts at the first unfinished stage. Stage ``i`` runs
with seed ``recipe.seed + i``, so a resumed run computes the same numbers as an uninterrupted
one. Artifacts are written atomically; a half-written file is never visible.

Stage checkpoints hold whole modules (compressed models carry codebooks, masks, quantized
tensors that no fixed state_dict layout describes). They are read back with
``weights_only=True`` and an allowlist of module classes (``checkpoint.py``): an output folder
is not trusted input, and a planted checkpoint is refused in one line, never run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import distributed, progress
from ..core.data_check import check_task_and_model
from ..core.errors import TorchslimError
from ..core.isa import machine_facts
from ..core.measure import MeasureConfig, Record, measure
from ..core.stage import apply_stage, training_hooks
from ..core.train import fit
from ..core.utils import atomic_write, atomic_write_text, jsonable, seed_everything
from ..export.weights import load_weights, save_weights
from ..zoo import MODELS, PRETRAINED, build_model, build_task
from .checkpoint import load_module, save_module
from .recipe import Recipe, Stage, code_specs, load_recipe
from .run_state import (
    RunStateError,
    clean_outputs,
    folder_lock,
    recipe_keys,
    resume_point,
    sweep_temp_files,
)

Progress = Callable[[str], None]


def run_recipe(recipe: Recipe | str | Path | dict, out: str | Path | None = None, resume: bool = False,
               log: Progress = print, trust_code: bool = False) -> dict[str, Any]:
    """Run every stage of recipe, measuring after each; return (and write) the run summary.

    A recipe that names code ('package.module:function' for its task, model or teacher) runs
    that code: it is refused unless ``trust_code`` (CLI ``--trust-code``) approves it, and when
    the recipe lists ``trust_code: [modules]`` only those modules may be named. Approved, the
    current folder is importable, so a ``my_task.py`` beside the recipe is found.

    Under ``torchrun`` every rank runs this: training is data-parallel (``distributed.py``),
    rank 0 alone measures and writes (lock, checkpoints, artifacts, run.json) while the others
    wait, and after every stage the model is broadcast from rank 0 and verified identical."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    _approve_code(recipe, trust_code)
    out_dir = Path(out or recipe.spec.out or "out")
    with distributed.session():
        if not distributed.is_main():
            log = _silent
        with folder_lock(out_dir) if distributed.is_main() else _no_lock():
            return _run(recipe, out_dir, resume, log)


def _silent(message: str) -> None:
    """The log of ranks other than 0 (rank 0 tells the story once)."""


@contextlib.contextmanager
def _no_lock():
    yield


def _run(recipe: Recipe, out_dir: Path, resume: bool, log: Progress) -> dict[str, Any]:
    state_dir = out_dir / ".state"
    start = time.perf_counter()
    main = distributed.is_main()
    swept = sweep_temp_files(out_dir) if main else []
    if swept:
        log(f"removed {len(swept)} temp file(s) an interrupted write left: {', '.join(swept[:3])}")
    mcfg = MeasureConfig(batch_size=recipe.spec.measure.batch_size, threads=recipe.spec.measure.threads,
                         repeats=recipe.spec.measure.repeats)
    task = build_task(recipe.task.name, **recipe.task.kwargs)
    keys = recipe_keys(recipe.source)
    state = distributed.broadcast_object(_load_state(state_dir) if resume and main else None)
    if state is None:
        removed = clean_outputs(out_dir) if main else []
        if removed:
            log(f"cleaned the outputs of an earlier run in {out_dir}: {', '.join(removed[:4])}"
                + (", ..." if len(removed) > 4 else ""))
        model = _baseline(recipe, task, log)
        reference = copy.deepcopy(model).eval()  # later stages may change the model in place
        distributed.verify_identical(model, "baseline")
        rows = [_on_main(_measure, model, task, mcfg, out_dir, "baseline", None, {})]
        if _untrained(recipe):
            msg = (f"model {recipe.model.name!r} was neither trained (no `train:` block) nor given weights "
                   "(`model.weights`): compressing a randomly initialized model")
            rows[0].setdefault("flags", []).append(msg)
            log(f"warning: {msg}")
        state = {"done": 0, "checkpointed": [], "keys": keys, "rows": rows,
                 "timings": {"baseline": round(time.perf_counter() - start, 2)}}
        state = _save_state(state_dir, model, state, log)
        if 0 not in state["checkpointed"]:
            raise RunStateError("the baseline model cannot be checkpointed, so no stage can resume from it")
    else:
        first = resume_point(state, keys, state.get("checkpointed", []))
        model = load_module(_ckpt(state_dir, first))
        reference = load_module(_ckpt(state_dir, 0)).eval()
        state["done"], state["keys"] = first, {"baseline": keys["baseline"], "stages": keys["stages"]}
        state["rows"] = state["rows"][: first + 1]
        state["checkpointed"] = [i for i in state["checkpointed"] if i <= first]
        log(f"resuming after stage {first} of {len(recipe.stages)}")
    for i, stage in enumerate(recipe.stages):
        if i < state["done"]:
            continue
        t0 = time.perf_counter()
        log(f"stage {stage.name}: {stage.technique}")
        config = _with_teacher(stage.config, _ckpt(state_dir, 0))
        with progress.stage(_stage_label(i, len(recipe.stages), stage)):  # bars say which stage runs
            model, info, save = _run_stage(model, stage, config, task, recipe.spec.seed + i + 1)
        state["rows"].append(_on_main(_measure, model, task, mcfg, out_dir, stage.name, save, info, reference, i + 1))
        state["done"] = i + 1
        violation = _guard(state["rows"][0], state["rows"][-1], recipe.spec.guard, log)
        state["timings"][stage.name] = round(time.perf_counter() - t0, 2)
        state = _save_state(state_dir, model, state, log)
        if violation and recipe.spec.guard.error:
            raise GuardError(f"stage {stage.name!r}: {violation} (guard.error is true; raise guard.max_drop "
                             "or fix the stage, then --resume)")
    exports = _on_main(_export, model, task, recipe, out_dir, log)
    summary = _summary(recipe, state, exports, time.perf_counter() - start)
    if main:
        atomic_write_text(out_dir / "run.json", json.dumps(summary, indent=2, default=jsonable))
    distributed.barrier()  # no rank returns before run.json is there
    return summary


def _on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on rank 0 alone (measuring, writing), its result given to every rank; the others
    wait, so they neither write nor compete for the CPU that rank 0 is timing on."""
    result = fn(*args) if distributed.is_main() else None
    return distributed.broadcast_object(result)


def _approve_code(recipe: Recipe, trust_code: bool) -> None:
    specs = code_specs(recipe.source)
    if not specs:
        return
    modules = sorted({s.split(":")[0] for s in specs})
    if not trust_code:
        raise TorchslimError(f"recipe names code to import and run ({', '.join(specs[:3])}); if you trust it, "
                             f"pass --trust-code (run_recipe(..., trust_code=True)); built-in tasks and models "
                             "need no flag")
    listed = recipe.spec.trust_code
    unlisted = [m for m in modules if listed and m not in listed]
    if unlisted:
        raise TorchslimError(f"recipe imports {unlisted} but its trust_code lists only {listed}; add them there")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _ckpt(state_dir: Path, index: int) -> Path:
    """The model after stage ``index`` (0 = the baseline, also the distillation teacher)."""
    return state_dir / ("baseline.pt" if index == 0 else f"stage-{index}.pt")


def _baseline(recipe: Recipe, task, log: Progress) -> nn.Module:
    seed_everything(recipe.spec.seed)
    model = build_model(recipe.model.name, task, **recipe.model.kwargs)
    if recipe.model.weights:
        load_weights(model, recipe.model.weights)
    task.check_model(model)
    check_task_and_model(task, model, training=recipe.train is not None or any(
        s.finetune is not None or s.technique in ("train", "distill") for s in recipe.stages))
    if recipe.train is not None:
        log(f"baseline: training {recipe.model.name} on {task.name}")
        with progress.stage("baseline"):
            fit(model, task, recipe.train)
    return model


class GuardError(TorchslimError):
    """A stage lost more of the metric than the recipe's guard allows (guard.error: true)."""


def _untrained(recipe: Recipe) -> bool:
    """A zoo model that starts from random init, with no training and no weights."""
    name = recipe.model.name
    return recipe.train is None and not recipe.model.weights and name in MODELS and name not in PRETRAINED


def _guard(base: dict, row: dict, guard, log: Progress) -> str | None:
    """Flag row (in place) when its metric is more than guard.max_drop below the baseline's."""
    if base.get("metric") is None or row.get("metric") is None:
        return None
    drop = base["metric"] - row["metric"]
    if drop <= guard.max_drop + 1e-12:
        return None
    msg = (f"{row.get('metric_name') or 'metric'} dropped {drop:.4f} ({base['metric']:.4f} -> {row['metric']:.4f}), "
           f"more than guard.max_drop {guard.max_drop:g}")
    row.setdefault("flags", []).append(msg)
    log(f"warning: stage {row.get('stage')}: {msg}")
    return msg


def _with_teacher(config: Any, baseline_path: Path) -> Any:
    """A distillation stage without a teacher learns from the uncompressed baseline (recovery)."""
    if getattr(config, "teacher", "absent") is None and baseline_path.exists():
        return replace(config, teacher=load_module(baseline_path).eval())
    return config


def _stage_label(i: int, n: int, stage: Stage) -> str:
    """"stage 3/4 quantize" (plus the technique when the stage has its own name)."""
    same = stage.name == stage.technique
    return f"stage {i + 1}/{n} {stage.name}" + ("" if same else f" ({stage.technique})")


def _run_stage(model: nn.Module, stage: Stage, config: Any, task, seed: int):
    seed_everything(seed)
    result = apply_stage(model, config, task)
    model = result.model
    # every rank compressed the same model with the same seed; rank 0's result is the one kept
    distributed.sync_module(model, f"stage {stage.name!r}")
    info = dict(result.info)
    if stage.finetune is not None:
        info["finetune"] = fit(model, task, stage.finetune, hooks=training_hooks(model)).to_dict()
    distributed.verify_identical(model, f"stage {stage.name!r}")
    return model, info, result.save


def _measure(model, task, mcfg, out_dir: Path, name: str, save, info, reference=None, index: int = 0) -> dict[str, Any]:
    """Measure after a stage; the stage's own compact format (if any) gives the bytes. The
    baseline (``reference``) is timed interleaved with the stage's model, in the same process
    and repeats, so the row's speedup does not depend on when each was measured."""
    # numbered, so stage names that slug alike ("a/b", "a_b") never write the same file
    artifact = out_dir / "artifacts" / f"{index:02d}-{_slug(name)}"
    if save is not None:
        path = artifact.with_suffix(".bin")
        atomic_write(path, lambda p: save(model, str(p)))
        fmt = "stage format"
    else:
        path = save_weights(model, artifact.with_suffix(".safetensors"))
        fmt = "safetensors state_dict"
    record: Record = measure(model, task, mcfg, saved_path=path, stage=name, reference=reference)
    row = record.to_dict()
    row["artifact"] = str(path.relative_to(out_dir))
    row["artifact_format"] = fmt
    row["info"] = jsonable(info)
    return row


def _export(model, task, recipe: Recipe, out_dir: Path, log: Progress) -> dict[str, str]:
    # A model that runs an ONNX Runtime graph has no PyTorch weights: its state dict is
    # empty, so a safetensors file (or an archive) of it would hold nothing. Refuse first.
    empty = [k for k in recipe.spec.export if k in ("safetensors", "archive")]
    if empty and isinstance(getattr(model, "onnx_bytes", None), (bytes, bytearray)):
        raise TorchslimError(f"export {empty[0]}: the model runs in ONNX Runtime and has no PyTorch weights "
                             "to write; use export: [onnx] (the runtime graph with its weights)")
    done = {}
    for kind in recipe.spec.export:
        if kind == "safetensors":
            done[kind] = str(save_weights(model, out_dir / "model.safetensors"))
        elif kind == "onnx":
            from ..export.onnx import export_onnx

            path = out_dir / "model.onnx"
            onnx_bytes = getattr(model, "onnx_bytes", None)  # already a runtime graph (int8 ORT)
            if onnx_bytes is not None:
                done[kind] = str(atomic_write(path, lambda p, b=onnx_bytes: p.write_bytes(b)))
            else:
                done[kind] = str(export_onnx(model, task.example_inputs(8), path))
        elif kind == "archive":
            from ..export.archive import save_archive

            path = out_dir / "model.tsla"
            save_archive(model, str(path))
            done[kind] = str(path)
        log(f"export {kind}: {done[kind]}")
    return done


def _summary(recipe: Recipe, state: dict, exports: dict, seconds: float) -> dict[str, Any]:
    import torchslim

    return {
        "recipe": recipe.source,
        "name": recipe.spec.name,
        "seed": recipe.spec.seed,
        "stages": [{"name": s.name, "technique": s.technique, "config": jsonable(s.config),
                    "finetune": jsonable(s.finetune)} for s in recipe.stages],
        "rows": state["rows"],
        "exports": exports,
        "timings": state["timings"],
        "seconds": round(seconds, 2),
        "versions": {"torchslim": getattr(torchslim, "__version__", "?"), "torch": torch.__version__,
                     "python": platform.python_version()},
        "machine": machine_facts(state["rows"][0].get("threads") if state["rows"] else None),
    }


def _save_state(state_dir: Path, model: nn.Module, state: dict, log: Progress) -> dict:
    """Checkpoint the model after stage ``state['done']`` and the rows (rank 0 writes; every
    rank gets the state back). Every stage keeps its checkpoint, so a resume after a changed
    stage starts from the one before it. A model that cannot be serialized (an exotic module
    state) is not checkpointed: a resume then restarts from the last one that was."""
    if distributed.is_main():
        _write_state(state_dir, model, state, log)
    return distributed.broadcast_object(state)


def _write_state(state_dir: Path, model: nn.Module, state: dict, log: Progress) -> None:
    done = state["done"]
    try:
        save_module(model, _ckpt(state_dir, done))
        state["checkpointed"] = sorted(set(state["checkpointed"]) | {done})
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as exc:
        # not OSError: a full disk or a permission error must stop the run, not be swallowed
        last = max(state["checkpointed"], default=0)
        log(f"note: model after stage {done} cannot be checkpointed ({type(exc).__name__}: {str(exc)[:120]}); "
            f"a resume restarts after stage {last}")
    atomic_write_text(state_dir / "state.json", json.dumps(state, default=jsonable))


def _load_state(state_dir: Path) -> dict | None:
    path = state_dir / "state.json"
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunStateError(f"--resume: {str(path)!r} is damaged; run again without --resume") from None
    if not isinstance(state, dict) or not isinstance(state.get("rows"), list) or "done" not in state:
        raise RunStateError(f"--resume: {str(path)!r} is not a torchslim run state; run without --resume")
    return state



def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)

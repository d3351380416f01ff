"""online(model, stream, OnlineConfig): prequential (test-then-train) learning that keeps the
model's compression exact.

Each arriving batch is first predicted (eval mode, no gradient) and scored, its per-sample
errors go to the drift detector, and only then is it learned from: ``steps_per_batch``
optimizer steps on the batch (plus a replay sample), with the loss of ``fit`` (the task's loss
and every hook's ``extra_loss``, EWC's included) and, after every step, every hook's
``after_step``: ``torchslim.core.stage.training_hooks(model)`` gives the providers of the
compression present (pruning masks re-applied, LSQ scales kept positive). Shared weights stay
shared by construction (their weight is ``codebook[indices]``: only centroids get gradients)
and fake-quant models train through their fake-quantizers, so the step needs nothing more.

A per-batch loop rather than ``fit``: fit runs epochs over a Task's train loader and validates
after each; a stream has no epochs and no validation split. The step itself is fit's (same
loss composition and hook order).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import TorchslimError
from ..core.stage import training_hooks
from ..core.task import as_tensor, call_model, tensor_loss
from ..core.train import TrainConfig, build_optimizer, build_scheduler
from ..core.utils import eval_mode, model_device, to_device
from . import state as ckpt_state
from .config import OnlineConfig
from .drift import DriftMonitor
from .forgetting import EWC, ReplayBuffer
from .invariants import coded_bytes_delta, differences, fingerprint
from .regrow import regrow_by_gradient, swap_by_gradient
from .teach import DriftTeacher, resolve_teacher

WINDOW = 20  # batches in the running prequential accuracy (and the pre-/post-drift levels)


@dataclass
class OnlineResult:
    """What happened: the prequential accuracy overall and per batch, drift events, held-out
    segment accuracies over time (forgetting), throughput, and the compression check."""

    batches: int
    samples: int
    prequential_accuracy: float
    curve: list[dict[str, float]]
    drift_events: list[dict[str, Any]]
    segment_eval: list[dict[str, float]]
    seconds: float
    samples_per_s: float
    regrown: int = 0
    swapped: int = 0  # weights moved by drop-and-grow (non-zeros per tensor unchanged)
    teacher_batches: int = 0  # batches learned with the teacher's distillation loss
    resumed_from: int | None = None
    compression_unchanged: bool | None = None
    compression_changes: list[str] = field(default_factory=list)
    coded_bytes_delta: dict[str, int] = field(default_factory=dict)
    fingerprint_before: dict[str, Any] | None = None
    fingerprint_after: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def accuracy_between(self, first: int, last: int | None = None) -> float:
        """Prequential accuracy over batches [first, last) (sample-weighted)."""
        pts = [p for p in self.curve if p["batch"] >= first and (last is None or p["batch"] < last)]
        n = sum(p["n"] for p in pts)
        return sum(p["acc"] * p["n"] for p in pts) / n if n else math.nan


def _bar(cfg: OnlineConfig, stream: Iterable[Any], offset: int):
    """The one bar over the stream (``torchslim.core.progress``; "auto"/None = its auto rule): as
    many steps as the stream has batches (up to max_batches) when that is known, else an open
    count; a resumed run starts at its offset."""
    from ..core import progress
    from .stream import stream_length

    total = stream_length(stream)
    if cfg.max_batches is not None:
        total = cfg.max_batches if total is None else min(total, cfg.max_batches)
    setting = None if cfg.progress in (None, "auto") else bool(cfg.progress)
    return progress.bar("online learning", total, setting=setting, completed=offset)


def _status(loop: dict[str, Any]) -> dict[str, Any]:
    """What the bar says: throughput, prequential accuracy and drift events so far (the numbers
    OnlineResult reports, computed the same way)."""
    rate = loop["samples"] / max(loop["seconds"], 1e-9)
    acc = loop["correct"] / loop["samples"] if loop["samples"] else math.nan
    return {"samples/s": f"{rate:,.0f}", "prequential acc": f"{acc:.4f}", "drift events": len(loop["events"])}


def _evaluate(model: nn.Module, sets: dict[str, tuple[Any, torch.Tensor]], device) -> dict[str, float]:
    out = {}
    with eval_mode(model), torch.no_grad():
        for name, (x, y) in sets.items():
            pred = as_tensor(call_model(model, to_device(x, device))).argmax(-1).cpu()
            out[name] = float((pred == y).float().mean())
    return out


def param_groups(model: nn.Module, cfg: OnlineConfig) -> list[dict[str, Any]]:
    """One group for the dense tensors at ``cfg.lr``, one per pruned tensor at
    ``cfg.lr * (1 / density) ** cfg.sparse_lr_power``.

    Why: with Adam every kept weight moves by about lr per step whatever its layer's density,
    so a layer keeping 5% of its weights changes its outputs far less per step than the dense
    layer it replaces and re-learns after a drift that much slower (B11 measured it: without
    the scaling the 90%-pruned LeNet reached 0.86-0.92 of the dense online model's prequential
    accuracy on the rotation, with the default 0.5 0.95-0.99). Groups are fixed at the start:
    growth without keep_sparsity does not rescale them; drop-and-grow keeps the densities."""
    from ..pruning.masks import masks_of, param_of

    trainable = [p for p in model.parameters() if p.requires_grad]
    scaled: dict[int, float] = {}
    if cfg.sparse_lr_power > 0:
        for name, m in masks_of(model).items():
            p = param_of(model, name)
            kept = int(m.sum())
            if isinstance(p, nn.Parameter) and p.requires_grad and 0 < kept < m.numel():
                scaled[id(p)] = (m.numel() / kept) ** cfg.sparse_lr_power
    groups = [{"params": [p for p in trainable if id(p) not in scaled], "lr": cfg.lr}]
    groups += [{"params": [p], "lr": cfg.lr * scaled[id(p)]} for p in trainable if id(p) in scaled]
    return [g for g in groups if g["params"]]


def _optimizer(model: nn.Module, cfg: OnlineConfig):
    tc = TrainConfig(lr=cfg.lr, optimizer=cfg.optimizer, optimizer_kwargs=cfg.optimizer_kwargs,
                     scheduler=cfg.scheduler, scheduler_kwargs=cfg.scheduler_kwargs, epochs=1)
    groups = param_groups(model, cfg)
    if not groups:
        raise TorchslimError("online: the model has no trainable parameters; use OnlineConfig(learn=False) to only score")
    opt = build_optimizer(groups, tc)
    return opt, build_scheduler(opt, tc)


def online(model: nn.Module, stream: Iterable[Any], cfg: OnlineConfig | None = None, *,
           loss: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy,
           eval_sets: dict[str, tuple[Any, torch.Tensor]] | None = None,
           checkpoint_dir: str | Path | None = None, resume: bool = False,
           on_batch: Callable[[int, dict[str, Any]], None] | None = None,
           on_checkpoint: Callable[[nn.Module, int], None] | None = None,
           check_compression: bool = True) -> OnlineResult:
    """Learn from ``stream`` in place, test-then-train; see the module doc and OnlineConfig.

    loss: ``loss(outputs, targets)`` (a Task's ``loss``); scoring is top-1 accuracy.
    eval_sets: held-out ``{name: (x, y)}`` (e.g. one per stream segment) scored every
        ``cfg.eval_every`` batches and at the end: accuracy on earlier segments is forgetting.
    checkpoint_dir / resume: write ``online.pt`` every ``cfg.checkpoint_every`` batches and at
        the end; resume continues at the next unseen batch (the stream must be re-creatable).
    on_batch: called after each batch with (offset, curve point) (e.g. a folder watcher).
    on_checkpoint: called with (model, offset) at every checkpoint and at the end (the app
        re-exports a fake-quant model to its real int8 backend there; online_app.py).
    check_compression: fingerprint the compression before and after (it saves the model's
        files to count their bytes: off when timing single steps).
    """
    cfg = cfg or OnlineConfig()
    loss = tensor_loss(loss)
    device = model_device(model)
    torch.manual_seed(cfg.seed)
    hooks = training_hooks(model) if cfg.learn else []
    ewc = EWC(cfg.ewc_lambda) if cfg.learn and cfg.ewc_lambda > 0 else None
    if ewc is not None:
        hooks.append(ewc)
    opt, sched = _optimizer(model, cfg) if cfg.learn else (None, None)
    replay = ReplayBuffer(cfg.replay_capacity, cfg.seed) if cfg.learn and cfg.replay_capacity else None
    monitor = DriftMonitor(cfg.detector, cfg.drift_delta)
    teacher = _teacher(cfg, device)
    recent: deque = deque(maxlen=max(cfg.ewc_batches, WINDOW))
    loop: dict[str, Any] = {"offset": 0, "samples": 0, "correct": 0, "curve": [], "events": [], "evals": [],
                            "boost_left": 0, "check_at": None, "pre_drift": None, "regrown": 0, "swapped": 0,
                            "rounds": 0, "seconds": 0.0, "fingerprint": None}
    path = Path(checkpoint_dir) / ckpt_state.NAME if checkpoint_dir is not None else None
    resumed_from = None
    if resume and path is not None and path.exists():
        items, loop = ckpt_state.load(path, model, opt, sched, replay, ewc, monitor)
        recent.extend(items)
        resumed_from = loop["offset"]
        if teacher is not None:
            teacher.left = loop.get("teacher_left", 0)
    if loop["fingerprint"] is None and check_compression:
        loop["fingerprint"] = fingerprint(model)
    sets = eval_sets or {}
    start = time.perf_counter() - loop["seconds"]
    from .stream import batches_from

    with _bar(cfg, stream, loop["offset"]) as bar:
        def say(text: str) -> None:  # progress.note's field, on this bar only (not on a bar outside it)
            bar.show(note=text)

        for x, y in batches_from(stream, loop["offset"]):
            if cfg.max_batches is not None and loop["offset"] >= cfg.max_batches:
                break
            offset = loop["offset"]
            x, y = to_device(x, device), to_device(y, device)
            model.eval()
            with torch.no_grad():
                pred = as_tensor(call_model(model, x)).argmax(-1)
            errors = (pred != y).cpu()
            point = {"batch": offset, "samples": loop["samples"] + len(y), "n": len(y), "acc": 1.0 - float(errors.float().mean())}
            loop["curve"].append(point)
            loop["samples"] += len(y)
            loop["correct"] += int((~errors).sum())
            events = monitor.update(errors, offset)
            for e in events:
                loop["events"].append(e.to_dict())
                say(f"drift ({e.direction}) at batch {offset}: error {e.error_before:.3f} -> {e.error_after:.3f}")
            if cfg.learn:
                if any(e.direction == "up" for e in events):
                    _on_drift(model, cfg, loop, ewc, recent, loss)
                    if teacher is not None:
                        teacher.on_drift()
                _learn(model, x, y, cfg, loop, opt, sched, hooks, replay, loss, teacher)
                if teacher is not None:
                    loop["teacher_batches"] = loop.get("teacher_batches", 0) + int(teacher.active)
                    teacher.end_batch()
                    loop["teacher_left"] = teacher.left
                recent.append((x.detach().cpu(), y.detach().cpu()))
                if loop["check_at"] is not None and offset >= loop["check_at"]:
                    _maybe_regrow(model, cfg, loop, recent, loss, say)
            loop["offset"] = offset + 1
            loop["seconds"] = time.perf_counter() - start
            if sets and loop["offset"] % cfg.eval_every == 0:
                loop["evals"].append({"batch": loop["offset"], **_evaluate(model, sets, device)})
            if path is not None and loop["offset"] % cfg.checkpoint_every == 0:
                ckpt_state.save(path, model, opt, sched, replay, ewc, monitor, list(recent), loop)
            if on_checkpoint is not None and loop["offset"] % cfg.checkpoint_every == 0:
                on_checkpoint(model, loop["offset"])  # e.g. re-export a fake-quant model to its real backend
            bar.advance(1, **_status(loop))
            if on_batch is not None:
                on_batch(offset, point)
        loop["seconds"] = time.perf_counter() - start
        bar.show(**_status(loop))  # the final numbers, as OnlineResult reports them
    if sets and (not loop["evals"] or loop["evals"][-1]["batch"] != loop["offset"]):
        loop["evals"].append({"batch": loop["offset"], **_evaluate(model, sets, device)})
    if path is not None:
        ckpt_state.save(path, model, opt, sched, replay, ewc, monitor, list(recent), loop)
    if on_checkpoint is not None and loop["offset"] % cfg.checkpoint_every != 0:
        on_checkpoint(model, loop["offset"])  # the final state too
    before = loop["fingerprint"]
    after = fingerprint(model) if before is not None else None
    changes = differences(before, after, masks_moved=loop.get("swapped", 0) > 0) if before is not None else []
    return OnlineResult(
        batches=loop["offset"], samples=loop["samples"],
        prequential_accuracy=loop["correct"] / loop["samples"] if loop["samples"] else math.nan,
        curve=loop["curve"], drift_events=loop["events"], segment_eval=loop["evals"],
        seconds=loop["seconds"], samples_per_s=loop["samples"] / max(loop["seconds"], 1e-9),
        regrown=loop["regrown"], swapped=loop.get("swapped", 0), teacher_batches=loop.get("teacher_batches", 0),
        resumed_from=resumed_from,
        compression_unchanged=(not changes) if before is not None else None, compression_changes=changes,
        coded_bytes_delta=coded_bytes_delta(before, after) if before is not None else {},
        fingerprint_before=before, fingerprint_after=after)


def _window_acc(loop: dict[str, Any], n: int = WINDOW) -> float:
    pts = loop["curve"][-n:]
    total = sum(p["n"] for p in pts)
    return sum(p["acc"] * p["n"] for p in pts) / total if total else math.nan


def _on_drift(model, cfg: OnlineConfig, loop, ewc, recent, loss) -> None:
    """Adapt: boost the LR for a while, consolidate EWC on the recent (pre-drift) window, and
    schedule a capacity check (regrowth) at the end of the boost."""
    loop["boost_left"] = cfg.boost_batches
    if loop["pre_drift"] is None or loop["check_at"] is None:
        loop["pre_drift"] = _window_acc(loop, WINDOW + 1)
    if cfg.regrow_fraction > 0:
        loop["check_at"] = loop["offset"] + max(cfg.boost_batches, WINDOW)
    if ewc is not None and recent:
        device = model_device(model)
        ewc.consolidate(model, [(to_device(x, device), to_device(y, device)) for x, y in list(recent)[-cfg.ewc_batches:]], loss)


def _maybe_regrow(model, cfg: OnlineConfig, loop, recent, loss, say) -> None:
    """Capacity check after a drift: while accuracy is still regrow_gap below its pre-drift
    level, move (keep_sparsity: drop-and-grow, same non-zeros per tensor) or add pruned weights,
    up to regrow_rounds times, one WINDOW apart, with the LR boost restarted for the new ones."""
    level, before = _window_acc(loop), loop["pre_drift"]
    loop["check_at"] = None
    if before is not None and not math.isnan(before) and level < before - cfg.regrow_gap:
        device = model_device(model)
        batches = [(to_device(x, device), to_device(y, device)) for x, y in recent]
        if cfg.regrow_keep_sparsity:
            n = swap_by_gradient(model, batches, loss, cfg.regrow_fraction)
            loop["swapped"] = loop.get("swapped", 0) + n
            say(f"capacity short (acc {level:.3f} < {before:.3f} - {cfg.regrow_gap}): moved {n} weights")
        else:
            n = regrow_by_gradient(model, batches, loss, cfg.regrow_fraction)
            loop["regrown"] += n
            say(f"capacity short (acc {level:.3f} < {before:.3f} - {cfg.regrow_gap}): regrew {n} weights")
        loop["rounds"] = loop.get("rounds", 0) + 1
        if n and loop["rounds"] < cfg.regrow_rounds:
            loop["check_at"] = loop["offset"] + WINDOW
            loop["boost_left"] = max(loop["boost_left"], cfg.boost_batches)
            return
    loop["pre_drift"], loop["rounds"] = None, 0


def _teacher(cfg: OnlineConfig, device) -> DriftTeacher | None:
    if cfg.teacher is None or not cfg.learn:
        return None
    return DriftTeacher(resolve_teacher(cfg.teacher).to(device), cfg.teacher_alpha, cfg.teacher_temperature,
                        cfg.teacher_batches)


def _learn(model, x, y, cfg: OnlineConfig, loop, opt, sched, hooks, replay, loss, teacher=None) -> None:
    if replay is not None and cfg.replay_batch > 0:
        extra = replay.sample(cfg.replay_batch)
        xs, ys = (torch.cat([x, extra[0].to(x.device)]), torch.cat([y, extra[1].to(y.device)])) if extra else (x, y)
    else:
        xs, ys = x, y
    scheduled = [g["lr"] for g in opt.param_groups]
    factor = cfg.boost_lr if loop["boost_left"] > 0 else 1.0
    for g, lr in zip(opt.param_groups, scheduled):
        g["lr"] = lr * factor
    model.train()
    for _ in range(cfg.steps_per_batch):
        out = call_model(model, xs)
        total = loss(out, ys)
        if teacher is not None:
            total = teacher.loss(total, model, xs, out, ys)
        for hook in hooks:
            if hasattr(hook, "extra_loss"):
                total = total + hook.extra_loss(model, xs, out, ys)
        if not math.isfinite(total.item()):
            raise TorchslimError(f"online: loss is {total.item()} at batch {loop['offset']}; lower OnlineConfig.lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        for hook in hooks:
            if hasattr(hook, "after_step"):
                hook.after_step(model, loop["offset"])
    for g, lr in zip(opt.param_groups, scheduled):
        g["lr"] = lr
    if sched is not None:
        sched.step()
    loop["boost_left"] = max(loop["boost_left"] - 1, 0)
    if replay is not None:
        replay.add(x, y)

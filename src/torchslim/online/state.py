"""Online checkpoints: everything needed to continue at the next unseen batch, as one file.

``online.pt`` holds tensors, plain numbers and strings only (model state, pruning masks, the
optimizer and scheduler states, RNG states, the replay buffer, EWC's Fisher and anchors, the
detector's error bits, the recent window) plus the loop's JSON state (stream offset, curve,
drift events); it is written atomically and read back with ``torch.load(weights_only=True)``,
so a planted file cannot run code. The stream offset in it is the number of batches fully
learned from: a kill between two checkpoints re-learns, from the checkpoint's weights, the
batches after it — no batch is skipped and none is learned twice into the saved state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.utils import atomic_write

NAME = "online.pt"


def save(path: Path, model: nn.Module, opt: Any, sched: Any, replay: Any, ewc: Any, monitor: Any,
         recent: list, loop: dict[str, Any]) -> None:
    from ..pruning.masks import masks_of

    payload = {
        "model": model.state_dict(),
        "masks": {k: v.detach().cpu().clone() for k, v in masks_of(model).items()},
        "optimizer": opt.state_dict() if opt is not None else None,
        "scheduler": sched.state_dict() if sched is not None else None,
        "rng_torch": torch.get_rng_state(),
        "replay": replay.state() if replay is not None else None,
        "ewc": ewc.state() if ewc is not None else None,
        "drift_bits": monitor.state(),
        "recent": [(x.detach().cpu(), y.detach().cpu()) for x, y in recent],
        "loop": json.dumps(loop),
    }
    atomic_write(path, lambda p: torch.save(payload, p))


def load(path: Path, model: nn.Module, opt: Any, sched: Any, replay: Any, ewc: Any, monitor: Any) -> tuple[list, dict[str, Any]]:
    from ..pruning.masks import attach_masks

    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["masks"]:
        attach_masks(model, payload["masks"], intersect=False)  # regrowth may have changed them
    model.load_state_dict(payload["model"])
    if opt is not None and payload["optimizer"] is not None:
        opt.load_state_dict(payload["optimizer"])
    if sched is not None and payload["scheduler"] is not None:
        sched.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng_torch"])
    if replay is not None and payload["replay"] is not None:
        replay.load_state(payload["replay"])
    if ewc is not None and payload["ewc"] is not None:
        ewc.load_state(payload["ewc"])
    monitor.load_state(payload["drift_bits"])
    return list(payload["recent"]), json.loads(payload["loop"])

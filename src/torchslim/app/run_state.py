"""What a run's output folder may be trusted to hold, and who may write it (issue 12, point 3).

- **One writer.** ``folder_lock`` takes an exclusive ``flock`` on ``<out>/.state/lock`` for the
  whole run; a second run on the same folder refuses in one line naming the holder's pid. The
  kernel drops the lock when its process dies (SIGKILL included), so a stale lock never blocks.
- **Resume checks what it resumes.** The state records a key (SHA-256 of the canonical JSON)
  of the baseline part of the recipe (task, model and the bytes of its weights file, seed,
  train, measure) and one per stage. On ``--resume``, a changed baseline part is refused in one
  line (every row would change); a changed stage re-runs from that stage on, starting from the
  checkpoint written after the stage before it.
- **A fresh run into a used folder cleans it.** Without ``--resume``, what an earlier torchslim
  run wrote there (run.json, report, plots, artifacts/, model.*, .state/) is removed first, so a
  stale ``model.tsla`` never sits beside a ``run.json`` that does not list it; other files are
  left alone. (Refusing instead would make every re-run of the demo need a flag.)
- **No stray temp files.** Temp files that a killed atomic write left (``.<name>.*.tmp``) are
  removed when a run starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import TorchslimError

OUTPUTS = ("run.json", "report.html", "model.safetensors", "model.onnx", "model.tsla", "artifacts", ".state")


class RunStateError(TorchslimError):
    """The output folder is busy, or its state does not belong to this recipe."""


@contextlib.contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on out_dir for the block; refuse if another run holds it."""
    state = out_dir / ".state"
    state.mkdir(parents=True, exist_ok=True)
    fh = open(state / "lock", "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise RunStateError(f"out folder {str(out_dir)!r} is in use by another torchslim run (pid {holder}); "
                                "wait for it or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


def sweep_temp_files(out_dir: Path) -> list[str]:
    """Remove the ``.<name>.*.tmp`` files a killed atomic write left behind."""
    removed = []
    if out_dir.is_dir():
        for p in out_dir.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(out_dir)))
    return removed


def clean_outputs(out_dir: Path) -> list[str]:
    """Remove what an earlier torchslim run wrote into out_dir (keeps the lock file)."""
    removed = []
    for name in OUTPUTS:
        p = out_dir / name
        if name == ".state" and p.is_dir():
            for child in p.iterdir():
                if child.name != "lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
                    removed.append(f".state/{child.name}")
        elif p.is_dir():
            shutil.rmtree(p)
            removed.append(name)
        elif p.exists():
            p.unlink()
            removed.append(name)
    for png in out_dir.glob("*.png") if out_dir.is_dir() else ():
        png.unlink()
        removed.append(png.name)
    return removed


def _key(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_digest(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recipe_keys(source: dict[str, Any]) -> dict[str, Any]:
    """{'baseline': key, 'stages': [key, ...]} of a recipe as written (see module doc)."""
    model = source.get("model")
    weights = model.get("weights") if isinstance(model, dict) else None
    base = {k: source.get(k) for k in ("task", "model", "seed", "train", "measure")}
    base["weights_sha256"] = _file_digest(weights)
    return {"baseline": _key(base), "stages": [_key(s) for s in source.get("stages", [])]}


def resume_point(state: dict[str, Any], keys: dict[str, Any], checkpointed: list[int]) -> int:
    """Index of the first stage to run on resume (0-based into the recipe's stages).

    Raises when the baseline part changed; a changed stage (or one past the end of what was
    done) re-runs from the latest checkpoint at or before it."""
    old = state.get("keys")
    if old is None:
        raise RunStateError("--resume: this state has no recipe keys (written by an older torchslim); "
                            "run again without --resume")
    if old["baseline"] != keys["baseline"]:
        raise RunStateError("--resume: the recipe's task, model, weights, seed, train or measure changed since "
                            "this run started; run without --resume (or use another --out)")
    first_change = next((i for i, (a, b) in enumerate(zip(old["stages"], keys["stages"])) if a != b),
                        min(len(old["stages"]), len(keys["stages"])))
    target = min(first_change, state["done"])
    return max([i for i in checkpointed if i <= target], default=0)

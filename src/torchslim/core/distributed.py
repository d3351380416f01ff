"""Running torchslim under ``torchrun``: DDP (gloo on CPU, NCCL on CUDA) and FSDP2.

``torchrun --nproc_per_node N -m torchslim run recipe.yaml`` starts N copies of the same run.
``init_from_env`` joins them into one process group (from torchrun's ``RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` variables); then every ``fit`` trains data-parallel and the
runner keeps one set of outputs. The rules:

- **Same global batch, same learning rate as one process.** Every rank reads the task's own
  train loader in the same seeded order and keeps its slice of each batch (per-rank batch =
  global / N, the first ``global % N`` ranks one sample more). A rank's loss is weighted by
  ``N * n_rank / n_global`` so DDP's gradient average is exactly the mean over the global batch,
  uneven last batches included: N processes follow one process's trajectory up to float
  summation order (BatchNorm batch statistics are per rank, as in plain DDP). The learning rate
  is not rescaled. Cost: each rank loads the whole global batch and drops the rest, which is
  free for in-memory tensors and wasteful for heavy decoding pipelines.
  (torch's ``DistributedSampler`` shards the *dataset* instead, so N processes see other batches
  than one process and no run can be compared step for step; accelerate's ``BatchSamplerShard``
  splits batches but pads uneven ones with repeated samples. Hence these few lines here.)
- **Compression state identical on every rank.** Parameters stay equal through DDP's gradient
  all-reduce; buffers (masks, codebooks, fake-quant scales and observers, BatchNorm statistics)
  are broadcast from rank 0 at every forward by DDP and again, with every parameter, after each
  epoch, after each fit and after each compression stage (``sync_module``); ``verify_identical``
  then compares a digest of every tensor across ranks and stops the run if they differ.
- **Only rank 0 writes** (``is_main``): checkpoints, artifacts, run.json, report. The other
  ranks train and wait.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import TorchslimError

MODES = ("ddp", "fsdp")


class DistributedError(TorchslimError):
    """The ranks of a torchrun job disagree (structure or values), or a mode is not supported."""


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK (before joining / after
    leaving the group), else 0."""
    return _dist().get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env(timeout_s: float = 7200.0) -> bool:
    """Join the process group torchrun describes in the environment (NCCL when CUDA is
    available, else gloo). A no-op (False) outside torchrun or with one process. The long
    timeout covers rank 0 measuring latency alone while the others wait at a barrier."""
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def teardown(sync: bool = True) -> None:
    """Leave the process group. With ``sync`` (a clean exit) every rank first meets at a barrier,
    so no rank tears its gloo connections down while a peer still uses them: without it, a rank
    that reached the end first and exited made the other abort in gloo's C++ teardown
    ("terminate called without an active exception", SIGABRT; seen about 1 run in 4 on a loaded
    2-core machine). After an error ``sync`` is False: a barrier could wait out the whole timeout
    for a rank that died.

    The barrier alone still left the same abort about 3 runs in 20 on a loaded machine, after
    every output was written: DDP's reducer and FSDP2's device mesh hold the process group in
    reference cycles, so its gloo threads were destroyed only at interpreter shutdown, when
    destroying a still-joinable thread aborts. A ``gc.collect()`` right after leaving frees them
    while Python is alive (0 in 40 runs afterwards, same load); the caller should drop its own
    references to wrapped models first (tests/train_worker.py tears down after its work returns)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """``with session():`` the process group for a block (joined from torchrun's environment)."""
    started = init_from_env()
    clean = False
    try:
        yield active()
        clean = True
    finally:
        if started:
            teardown(sync=clean)


def barrier() -> None:
    if active():
        _dist().barrier()


def broadcast_object(obj: Any) -> Any:
    """rank 0's ``obj`` on every rank (pickled by torch.distributed among our own processes)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_mean(value: float) -> float:
    """Mean of a float over the ranks (a no-op in one process)."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    _dist().all_reduce(t)
    return float(t.item()) / world_size()


def _comm_device() -> torch.device:
    return device() if _dist().get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------- batches


def shard_batch(inputs: Any, targets: Any, rank_: int | None = None, world: int | None = None) -> tuple[Any, Any, float]:
    """This rank's contiguous slice of a global batch, and the weight of its mean loss.

    Sizes follow ``torch.tensor_split`` (the first ``n % world`` ranks get one more); weight is
    ``world * n_rank / n`` so that the average of the ranks' weighted mean losses is the mean
    loss of the global batch. A rank left without samples (n < world) gets the batch's first
    sample with weight 0: it still joins the collective backward but adds nothing."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    n = _batch_len(targets)
    sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    start = sum(sizes[:rank_])
    size = sizes[rank_]
    if size == 0:
        return _slice(inputs, 0, 1), _slice(targets, 0, 1), 0.0
    return _slice(inputs, start, start + size), _slice(targets, start, start + size), world * size / n


def _batch_len(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0])
    if isinstance(obj, Mapping):
        return _batch_len(next(iter(obj.values())))
    if isinstance(obj, (list, tuple)):
        return _batch_len(obj[0])
    raise DistributedError(f"cannot split a batch of {type(obj).__name__} across ranks; yield tensors "
                           "(or dicts/tuples of tensors) with the batch on dim 0")


def _slice(obj: Any, lo: int, hi: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi]
    if isinstance(obj, Mapping):
        return {k: _slice(v, lo, hi) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(v, lo, hi) for v in obj)
    return obj


# ---------------------------------------------------------------- model state


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer (non-persistent ones too: pruning masks live there)."""
    seen: set[int] = set()
    out = []
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def structure(model: nn.Module) -> str:
    """Digest of names, shapes and dtypes of every tensor (what a broadcast needs to agree on)."""
    h = hashlib.sha256()
    for name, t in _tensors(model):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def digest(model: nn.Module) -> str:
    """Digest of every tensor's bytes (and the structure)."""
    h = hashlib.sha256(structure(model).encode())
    for _, t in _tensors(model):
        h.update(_bytes(t.detach()))
    return h.hexdigest()[:16]


def _bytes(t: torch.Tensor) -> bytes:
    if t.is_quantized:
        t = t.int_repr()
    if not t.numel():
        return b""
    try:
        return t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError, NotImplementedError):  # a tensor subclass (torchao, DTensor) without a plain view
        return repr((type(t).__name__, tuple(t.shape), str(t.dtype))).encode()


def _gather(value: Any) -> list[Any]:
    box: list[Any] = [None] * world_size()
    _dist().all_gather_object(box, value)
    return box


@torch.no_grad()
def sync_module(model: nn.Module, where: str, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers onto every rank, after checking that all ranks
    hold the same tensors (names, shapes, dtypes); a difference stops the run naming ``where``."""
    if not active():
        return
    shapes = _gather(structure(model))
    if len(set(shapes)) != 1:
        raise DistributedError(f"{where}: the ranks hold differently shaped models ({shapes}); a stage made "
                               "rank-dependent decisions")
    dist = _dist()
    params = {id(p) for p in model.parameters()}
    for _, t in _tensors(model):
        if (buffers_only and id(t) in params) or t.is_quantized or t.numel() == 0 or type(t.data) is not torch.Tensor:
            continue  # not over gloo: verify_identical compares quantized ints (subclasses: shapes only)
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            moved = t.to(device())
            dist.broadcast(moved, src=0)
            t.copy_(moved)
        else:
            dist.broadcast(t.data, src=0)


def verify_identical(model: nn.Module, where: str) -> str:
    """The digest of every tensor, checked equal on all ranks; DistributedError otherwise."""
    mine = digest(model)
    if not active():
        return mine
    all_ = _gather(mine)
    if len(set(all_)) != 1:
        raise DistributedError(f"{where}: model state differs between ranks (digests {all_})")
    return mine


# ---------------------------------------------------------------- wrapping


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around model (on this rank's device). Unused parameters are
    allowed (a frozen head, a teacher's projection), at the cost of one graph walk per step."""
    from torch.nn.parallel import DistributedDataParallel

    dev = device()
    ids = [dev.index] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def wrap_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard every leaf module that holds parameters, then the root (``fully_shard``)."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)
    return model


def gather_full_state(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP2 model on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def grads_outside(module: nn.Module, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Optimizer parameters that DDP does not reduce (not part of the wrapped module)."""
    inside = {id(p) for p in module.parameters()}
    flat = [q for p in params for q in (p["params"] if isinstance(p, Mapping) else [p])]  # param groups too
    return [p for p in flat if id(p) not in inside]


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks (for parameters outside DDP's module)."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            _dist().all_reduce(p.grad)
            p.grad.div_(world_size())


# ---------------------------------------------------------------- launching


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``torchslim *argv`` in ``nproc`` processes under torchrun (``--standalone``: one
    machine, a free port); returns torchrun's exit code. The CLI's ``--nproc`` calls this."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or not 1 <= nproc <= 1024:
        raise TorchslimError(f"--nproc: must be an integer in [1, 1024], got {nproc!r}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "torchslim", *argv]
    return subprocess.call(cmd)

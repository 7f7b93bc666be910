"""Data-parallel passes under ``torch.distributed``: who this process is, its shard of the data, and the
collectives that merge the passes' accumulators.

Launched the standard way (``torchrun --nproc_per_node K -m bncorrect estimate ...``, or the Python API
called on every rank of an initialised process group), every pass reads its rank's shard of the seeded
order and merges what it accumulated at the end of the pass: each accumulator has one pure merge function
beside it (:func:`bncorrect.recalibration.merge_moments` and ``merge_changes``,
:func:`bncorrect.estimation.merge_reservoirs`, :func:`bncorrect.sweep.merge_tallies` and
``merge_segmentation_tallies``, :func:`bncorrect.tune.merge_score_sums`,
:func:`bncorrect.diagnosis.merge_meters`); this module only moves their state between ranks. Without a
process group (or with one process) nothing here does anything: the passes run exactly as in one process.

Shards (:func:`shard_order`): the seeded order is cut into the loader's batches (each a multiple of every
normalization batch size B, so no group of B straddles two batches) and batch ``i`` goes to rank
``i % world``: the ranks together see exactly the batches one process sees, the same groups of B, and the
last short batch on whichever rank gets it; shards differ by at most one batch (and are empty on the ranks
past the last batch when there are fewer batches than ranks).

Failures: a pass that fails on one rank must not leave the others waiting in a collective. Every pass runs
under :func:`guarded`: after the pass, the ranks exchange whether they failed, and all raise the error of
the first rank that did (a :class:`~bncorrect.errors.BncorrectError` keeps its class, message and hint).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from . import errors

T = TypeVar("T")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return int(_dist().get_rank()) if active() else 0


def world_size() -> int:
    """How many processes share the passes (1 without a process group)."""
    return int(_dist().get_world_size()) if active() else 1


def is_writer() -> bool:
    """True on the process that writes files, shows progress and prints: rank 0, or the only process."""
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    """``RANK`` set by torchrun (0 when not launched by it): known before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def init_from_env(device: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) unless one exists. Backend: ``cpu:gloo,cuda:nccl`` when CUDA is
    available and ``device`` is not ``cpu`` (tensors on either device can be merged), else ``gloo``; the
    ``BNCORRECT_DIST_BACKEND`` environment variable overrides it. With CUDA, each process uses the GPU of
    its ``LOCAL_RANK``. Returns True when this call created the group (the caller then destroys it)."""
    dist = _dist()
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    use_cuda = (
        torch.cuda.is_available() and str(device or "auto") != "cpu" and not str(device).startswith("mps")
    )
    backend = os.environ.get("BNCORRECT_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as e:
        raise errors.UsageError(
            f"cannot join the torch.distributed process group ({backend}): {errors.shorten(str(e))}",
            hint="launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or set "
            "BNCORRECT_DIST_BACKEND=gloo",
        ) from e
    return True


def shutdown() -> None:
    """Destroy the default process group (after :func:`init_from_env` made it)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under a process group, ``cuda`` without an index means this rank's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


# ------------------------------------------------------------------------------------------------ shards
def shard_order(order: Sequence[int], batch_size: int, rank: int, world: int) -> list[int]:
    """This rank's indices of ``order``: the batches of ``batch_size`` consecutive entries that fall to it
    (batch ``i`` to rank ``i % world``), concatenated; batching them again by ``batch_size`` gives exactly
    those batches (the only short batch is the last of ``order``, which is the last of its rank)."""
    if world <= 1:
        return list(order)
    out: list[int] = []
    for start in range(rank * batch_size, len(order), world * batch_size):
        out.extend(order[start : start + batch_size])
    return out


class ShardedBatches:
    """Every ``world``-th batch of an iterable, from batch ``rank`` on (re-iterable when ``batches`` is):
    the shard of batches that are already made (a user's DataLoader); the others are still read."""

    def __init__(self, batches: Iterable[Any], rank: int, world: int) -> None:
        self.batches = batches
        self.rank = rank
        self.world = world

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            if i % self.world == self.rank:
                yield batch


# ----------------------------------------------------------------------------------------------- collectives
def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable; tensors travel on the CPU), in rank order; ``[obj]`` alone."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, _to_cpu(obj))
    return out


def gather_to_writer(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None on the others; ``[obj]`` alone."""
    if not active():
        return [obj]
    dist = _dist()
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(_to_cpu(obj), out, dst=0)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [_to_cpu(obj) if rank() == 0 else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def sum_ints(*values: int) -> tuple[int, ...]:
    """Each of ``values`` summed over the ranks."""
    if not active():
        return tuple(int(v) for v in values)
    rows = all_gather(tuple(int(v) for v in values))
    return tuple(sum(r[i] for r in rows) for i in range(len(values)))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------- failures
def _describe(exc: BaseException | None) -> tuple[str, str, str | None, str | None, str | None] | None:
    if exc is None:
        return None
    if isinstance(exc, errors.BncorrectError):
        return type(exc).__name__, exc.message, exc.path, exc.hint, exc.detail
    return type(exc).__name__, errors.shorten(str(exc) or type(exc).__name__), None, None, None


def _rebuild(desc: tuple[str, str, str | None, str | None, str | None], where: int) -> BaseException:
    name, message, path, hint, detail = desc
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.BncorrectError):
        return cls(message, path=path, hint=hint, detail=detail)
    return RuntimeError(f"rank {where} failed: {name}: {message}")


def raise_if_failed(exc: BaseException | None) -> None:
    """Collective: every rank says whether it failed (``exc``); then all ranks raise — their own error,
    or the first failing rank's — or none does."""
    if not active():
        if exc is not None:
            raise exc
        return
    failures = all_gather(_describe(exc))
    if exc is not None:
        raise exc
    for where, desc in enumerate(failures):
        if desc is not None:
            raise _rebuild(desc, where)


def guarded(fn: Callable[[], T]) -> T:
    """``fn()``, then (under a process group) :func:`raise_if_failed`: a failure on any rank is raised on
    every rank instead of leaving the others waiting in the next collective."""
    if not active():
        return fn()
    try:
        result = fn()
    except Exception as e:  # re-raised on every rank
        raise_if_failed(e)
        raise  # unreachable: raise_if_failed raised it
    raise_if_failed(None)
    return result


def on_writer(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only, its result (or its error) on every rank."""
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as e:  # re-raised on every rank
            outcome = (False, e)
    shared = broadcast((outcome[0], outcome[1] if outcome[0] else _describe(outcome[1])))
    if rank() == 0 and not outcome[0]:
        raise outcome[1]
    if not shared[0]:
        raise _rebuild(shared[1], 0)
    return shared[1]  # type: ignore[no-any-return]


def quiet_warnings() -> None:
    """On ranks other than 0 (torchrun's environment), Python warnings are not shown: rank 0 shows them."""
    if env_world_size() > 1 and env_rank() != 0:
        warnings.simplefilter("ignore")


__all__ = [
    "ShardedBatches",
    "active",
    "all_gather",
    "broadcast",
    "gather_to_writer",
    "guarded",
    "init_from_env",
    "is_writer",
    "local_device",
    "on_writer",
    "raise_if_failed",
    "rank",
    "shard_order",
    "shutdown",
    "sum_ints",
    "world_size",
]

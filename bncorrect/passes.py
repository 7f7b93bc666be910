"""Running a model over data: devices, forward functions, batch trimming, progress reporting.

The estimator, the recalibration and the sweep all run a model over batches; this module is the one place
that knows how. The library never prints: progress goes to an optional callback
``progress(description, completed, total)`` (examples; ``total`` may be None).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DataError, UsageError

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
Progress = Callable[[str, int, int | None], None]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else must be available."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here", hint="use --device cpu or auto")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available here", hint="use --device cpu or auto")
    return dev


def batch_size_of(batch: Batch) -> int:
    """Number of examples in a batch: the leading dimension of its first tensor."""
    t = first_tensor(batch)
    if t is None:
        raise DataError("a batch holds no tensor")
    return int(t.shape[0])


def first_tensor(batch: Batch) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for v in batch.values():
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        for v in batch:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def map_batch(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """Apply ``fn`` to every tensor of a (nested) batch."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_batch(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(map_batch(v, fn) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """``model(x)`` with ``x`` the first element of the batch (``(x,)`` or ``(x, y)``) or the batch itself."""
    x = batch[0] if isinstance(batch, tuple | list) else batch
    return model(x)


def trimmed_batches(batches: Iterable[Batch], multiple: int) -> Iterator[tuple[Batch, int]]:
    """Yield each batch cut to a multiple of ``multiple`` examples, with how many were dropped from it."""
    for batch in batches:
        n = batch_size_of(batch)
        keep = (n // multiple) * multiple
        if keep == n:
            yield batch, 0
        elif keep > 0:
            yield (
                map_batch(batch, lambda t, k=keep, n=n: t[:k] if t.dim() and t.shape[0] == n else t),
                n - keep,
            )
        else:
            yield None, n


def lcm(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def run_forward(
    model: nn.Module,
    batch: Batch,
    forward_fn: ForwardFn | None,
    device: torch.device,
    *,
    data_hint: str = "",
) -> Any:
    """One forward pass under ``torch.no_grad`` with the batch moved to ``device``.

    A shape error on the first call is turned into a :class:`DataError` that says the data does not fit.
    """
    batch = map_batch(batch, lambda t: t.to(device, non_blocking=True))
    try:
        with torch.no_grad():
            return (forward_fn or default_forward)(model, batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        if type(e).__name__ in ("OutOfMemoryError",):
            raise
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        t = first_tensor(batch)
        shape = tuple(t.shape) if t is not None else "?"
        raise DataError(
            f"the model failed on a data batch of shape {shape}: {msg}",
            path=data_hint or None,
            hint="check that the data matches the model's expected input (channels, size, preprocessing: "
            "--resize/--crop/--mean/--std), or pass a forward_fn for models with several inputs",
        ) from e

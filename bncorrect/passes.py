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


Observer = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
#: One training-mode pass over data the caller has fixed, whatever runs the model:
#: ``run(group_sizes, observers)`` normalizes every layer named in ``group_sizes`` over groups of that many
#: examples, calls ``observers[name](x, mu_i, var_i, mu_b, var_b)`` and returns (examples used, examples
#: dropped). :func:`training_mode_pass` (PyTorch) and :func:`bncorrect.onnx_passes.training_pass` are two.
TrainingPass = Callable[[Mapping[str, int], Mapping[str, Observer]], tuple[int, int]]


def training_mode_pass(
    work: nn.Module,
    batches: Iterable[Batch],
    group_sizes: Mapping[str, int],
    observers: Mapping[str, Observer],
    *,
    forward_fn: ForwardFn | None,
    device: torch.device,
    label: str,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> tuple[int, int]:
    """One pass with every CorrectedNorm of ``work`` in training-mode normalization over its group size.

    Each batch is cut to a multiple of the least common multiple of the group sizes. ``observers`` (by
    layer name) see ``(x, mu_i, var_i, mu_b, var_b)`` at every call. Everything is restored afterwards,
    also on failure. Returns (examples used, examples dropped); DataError when no whole group was seen.
    """
    from .layers import corrected_layers, normalization_mode

    layers = corrected_layers(work)
    with normalization_mode(work, "batch", group_sizes):
        try:
            for name, m in layers.items():
                m.observer = observers.get(name)
            return run_trimmed(
                batches,
                lcm(group_sizes.values()),
                lambda batch: run_forward(work, batch, forward_fn, device, data_hint=data_hint),
                label=label,
                total_examples=total_examples,
                progress=progress,
                data_hint=data_hint,
            )
        finally:
            for m in layers.values():
                m.observer = None


def run_trimmed(
    batches: Iterable[Batch],
    multiple: int,
    run: Callable[[Batch], object],
    *,
    label: str,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> tuple[int, int]:
    """Call ``run`` on every batch cut to a multiple of ``multiple`` examples (:func:`trimmed_batches`; a
    batch with fewer examples is skipped), reporting ``progress(label, examples seen, total_examples)``.

    The loop of every training-mode pass (PyTorch's :func:`training_mode_pass`, onnxruntime's
    :func:`bncorrect.onnx_passes.training_pass`). Returns (examples used, examples dropped);
    :class:`DataError` when no batch held ``multiple`` examples.
    """
    examples = dropped = 0
    for batch, cut in trimmed_batches(batches, multiple):
        dropped += cut
        if batch is not None:
            run(batch)
            examples += batch_size_of(batch)
        if progress is not None:
            progress(label, examples + dropped, total_examples)
    if examples == 0:
        raise DataError(
            f"no complete normalization batch of {multiple} examples in the data ({dropped} examples seen)",
            path=data_hint or None,
            hint="give more data or a smaller batch size",
        )
    return examples, dropped

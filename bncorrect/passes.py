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

from . import correction as C
from .errors import DataError, NumericalError, UsageError, shorten

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
Progress = Callable[[str, int, int | None], None]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else must be available."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            from .distributed import local_device

            return local_device(torch.device("cuda"))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here", hint="use --device cpu or auto")
    if dev.type == "cuda":
        from .distributed import local_device

        return local_device(dev)  # under a process group: this rank's GPU
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
        msg = shorten(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        t = first_tensor(batch)
        shape = tuple(t.shape) if t is not None else "?"
        raise DataError(
            f"the model failed on a data batch of shape {shape}: {msg}",
            path=data_hint or None,
            hint="check that the data matches the model's expected input (channels, size, preprocessing: "
            "--resize/--crop/--mean/--std), or pass a forward_fn for models with several inputs",
        ) from e


# ---------------------------------------------------------------------------------------------- non-finite
def describe_values(x: Tensor) -> str:
    """What is wrong with activations ``x``, in words: how many NaN/Inf values, or (all finite) how large
    they get, when their statistics overflow."""
    xd = x.detach()
    nan, inf = int(torch.isnan(xd).sum()), int(torch.isinf(xd).sum())
    if nan or inf:
        parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} Inf"] if inf else [])
        return f"{' and '.join(parts)} among {xd.numel()} values"
    big = float(xd.abs().max()) if xd.numel() else 0.0
    dtype = str(C.stats_dtype(xd)).removeprefix("torch.")
    return (
        f"values up to {big:.3g} in magnitude, too large for statistics in {dtype} (their variance overflows)"
    )


def _all_finite(t: Tensor | None) -> bool:
    return t is None or not t.is_floating_point() or bool(torch.isfinite(t).all())


def nonfinite_error(
    layer: str,
    x: Tensor | None,
    *,
    data_hint: str = "",
    data: Tensor | None = None,
    what: str = "the input",
    problem: str | None = None,
    hint: str | None = None,
) -> NumericalError:
    """The :class:`NumericalError` for non-finite values met at ``what`` (e.g. "the input") of ``layer``:
    the message names the layer, the data (``data_hint``) and what is wrong (``problem``, or
    :func:`describe_values` of ``x``); the hint says what to do. ``data``: the batch as read, to tell
    NaN/Inf in the data itself from NaN/Inf the model makes of finite data."""
    too_large = problem is None and x is not None and _all_finite(x)  # finite, yet statistics overflow
    if problem is None:
        problem = "NaN or Inf values" if x is None else describe_values(x)
    on = f" on {data_hint}" if data_hint else ""
    if data is not None and not _all_finite(data):
        return NumericalError(
            f"the data{' ' + data_hint if data_hint else ''} holds NaN/Inf values ({describe_values(data)} "
            f"in one batch); they reach {what} of layer {layer}",
            path=data_hint or None,
            hint="remove or repair the examples with NaN/Inf values, or fix the preprocessing that makes "
            "them (values, --mean/--std)",
        )
    if too_large:
        return NumericalError(
            f"values too large at {what} of layer {layer}{on}: {problem}",
            path=data_hint or None,
            hint=hint
            or "check the data and its preprocessing (values, scale, --mean/--std): inputs are expected at "
            f"about unit scale; the first too large values appear at {what} of layer {layer}",
        )
    return NumericalError(
        f"non-finite values (NaN/Inf) at {what} of layer {layer}{on}: {problem}",
        path=data_hint or None,
        hint=hint
        or "check the data and its preprocessing (values, --mean/--std) and the checkpoint (`bncorrect "
        f"inspect MODEL`); the first non-finite values appear at {what} of layer {layer}",
    )


def nonfinite_output_error(
    name: str, output: Tensor, broken: str | None, *, data_hint: str | None, owner: str
) -> NumericalError:
    """The error for a BN layer whose output is NaN/Inf although its input is finite: its statistics
    (``broken``, from :func:`bncorrect.health.statistics_problem`) or parameters are at fault. ``owner``:
    "checkpoint" or "graph", for the hint."""
    from .health import STATS_HINT

    return nonfinite_error(
        name,
        output,
        data_hint=data_hint,
        what="the output",
        problem=f"{describe_values(output)}, although its input is finite"
        + (f" ({broken})" if broken else ""),
        hint=STATS_HINT
        if broken
        else f"check the {owner}'s statistics and parameters (`bncorrect inspect MODEL`)",
    )


def check_observed(
    layer: str,
    x: Tensor,
    stats: Sequence[Tensor],
    *,
    data_hint: str = "",
    data: Tensor | None = None,
) -> None:
    """:func:`nonfinite_error` unless layer ``layer``'s input ``x`` gave finite statistics ``stats``
    (e.g. mu_i, var_i, mu_b, var_b: small (N, C) tensors, cheap to check; NaN/Inf in ``x`` makes them
    non-finite, and so do values whose variance overflows the statistics' dtype). Called at every BN
    layer of every batch, so the usual case is one reduction and one read whatever the number of tensors:
    the sum of all their values, NaN/Inf as soon as one of them is (an overflowing sum of finite values is
    told apart by checking each tensor)."""
    if _stats_finite(stats):
        return
    raise nonfinite_error(layer, x, data_hint=data_hint, data=data)


def _stats_finite(stats: Sequence[Tensor]) -> bool:
    floats = [t for t in stats if t.is_floating_point()]
    if not floats:
        return True
    # a sum is NaN/Inf when one of its terms is; when it is not finite although every term is (overflow),
    # the tensors are checked one by one. In their own dtype on their own device (no float64 on MPS).
    if math.isfinite(float(torch.cat([t.reshape(-1) for t in floats]).sum())):
        return True
    return all(_all_finite(t) for t in floats)


def raise_first_nonfinite(
    model: nn.Module,
    batch: Batch,
    layers: Mapping[str, nn.Module],
    *,
    forward_fn: ForwardFn | None,
    device: torch.device,
    data_hint: str = "",
) -> None:
    """Run ``model`` once on ``batch`` with hooks on the BN ``layers`` and raise :func:`nonfinite_error`
    for the first of them (in execution order) whose input is non-finite or too large for its statistics,
    or whose output is non-finite although its input is fine (broken statistics or parameters). Returns
    normally when every BN layer is fine (the non-finite values arise elsewhere). Meant for after the fact:
    a pass that met NaN/Inf somewhere uses it to say where."""
    from .layers import _stats_problem

    data = first_tensor(batch)

    def pre(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            if x is None or x.dim() < 2 or not x.is_floating_point():
                return
            mu_i, var_i = C.example_stats(x)
            check_observed(name, x, (mu_i, var_i), data_hint=data_hint, data=data)

        return hook

    def post(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(m: nn.Module, _inputs: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, Tensor) or _all_finite(output):
                return
            broken = _stats_problem(getattr(m, "norm", m))
            raise nonfinite_output_error(name, output, broken, data_hint=data_hint, owner="checkpoint")

        return hook

    handles = []
    try:
        for name, m in layers.items():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        run_forward(model, batch, forward_fn, device, data_hint=data_hint)
    finally:
        for h in handles:
            h.remove()


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
    batch_stat_sizes: Mapping[str, int] | None = None,
) -> tuple[int, int]:
    """One pass with every CorrectedNorm of ``work`` in training-mode normalization over its group size.

    Layers that normalize with batch statistics even in eval mode (``track_running_stats=False``,
    :func:`bncorrect.layers.batch_statistics_layers`; left uncorrected) normalize over groups of their
    size in ``batch_stat_sizes`` (by name), as in training, instead of the whole batch. Each batch is cut
    to a multiple of the least common multiple of all group sizes. ``observers`` (by layer name) see
    ``(x, mu_i, var_i, mu_b, var_b)`` at every call; NaN/Inf in any of these at any corrected layer raises
    :class:`NumericalError` naming the first such layer and the data. Everything is restored afterwards,
    also on failure. Returns (examples used, examples dropped); DataError when no whole group was seen.
    """
    from .layers import corrected_layers, grouped_batch_statistics, normalization_mode

    layers = corrected_layers(work)
    current: list[Tensor | None] = [None]

    def checked(name: str, observe: Observer | None) -> Observer:
        def check(x: Tensor, mu_i: Tensor, var_i: Tensor, mu_b: Tensor, var_b: Tensor) -> None:
            check_observed(name, x, (mu_i, var_i, mu_b, var_b), data_hint=data_hint, data=current[0])
            if observe is not None:
                observe(x, mu_i, var_i, mu_b, var_b)

        return check

    def run(batch: Batch) -> object:
        current[0] = first_tensor(batch)
        return run_forward(work, batch, forward_fn, device, data_hint=data_hint)

    sizes = [*group_sizes.values(), *(batch_stat_sizes or {}).values()]
    with normalization_mode(work, "batch", group_sizes), grouped_batch_statistics(work, batch_stat_sizes):
        try:
            for name, m in layers.items():
                m.observer = checked(name, observers.get(name))
            return run_trimmed(
                batches,
                lcm(sizes),
                run,
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
    from . import distributed

    if not distributed.active():  # under a process group: checked over all ranks at the end of the pass
        require_examples(examples, dropped, multiple, data_hint)
    return examples, dropped


def require_examples(examples: int, dropped: int, multiple: int, data_hint: str = "") -> None:
    """:class:`DataError` when a pass used no example (``dropped`` seen, none in a whole group of
    ``multiple``); under a process group the counts are those of all ranks."""
    if examples == 0:
        raise DataError(
            f"no complete normalization batch of {multiple} examples in the data ({dropped} examples seen)",
            path=data_hint or None,
            hint="give more data or a smaller batch size",
        )

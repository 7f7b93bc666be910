"""The Python API: one function per command, returning data (the CLI only renders it).

>>> import bncorrect
>>> out = bncorrect.rule("model.pt", train_batch_size=2, arch="my_models:resnet", out="corrected.pt")
>>> model = bncorrect.load("corrected.pt")             # corrected model, eval mode

Every function takes MODEL as a path, a loaded ``nn.Module``, a :class:`~bncorrect.models.LoadedModel`
or an :class:`OnnxModel`; loading options (``arch``, ``arch_kwargs``, ``trust_pickle``, ``strict``) are
keyword arguments. With ``out`` the result is written by suffix: ``.safetensors`` corrections file,
``.pt``/``.pth`` patched checkpoint, ``.onnx`` graph with rewritten normalization nodes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .correction import rule_of_thumb
from .corrections import Corrections, LayerCorrection, load_corrections, save_corrections
from .errors import ModelLoadError, NoBatchNormError, NumericalError, OnnxError, UsageError, spell
from .layers import correct_model, corrected_layers, find_norm_layers, set_running_stats
from .models import LoadedModel, load_model, save_checkpoint

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".onnx")


@dataclass
class OnnxModel:
    """An ONNX graph loaded from ``path``."""

    proto: Any
    path: Path
    sha256: str
    fingerprint: str = ""


Source = LoadedModel | OnnxModel
ModelLike = str | Path | nn.Module | LoadedModel | OnnxModel


@dataclass
class ExportOptions:
    """How to write ``.onnx`` from a PyTorch model."""

    input_shape: Sequence[int] | None = None
    example_input: Tensor | None = None
    opset: int | None = None
    dynamic_batch: bool = True
    verify: bool = True
    min_effect: float | None = None


@dataclass
class Outcome:
    """What a command produced: the corrections, the corrected model, where it was written, and a report."""

    corrections: Corrections
    model: Any
    source: Source
    output: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)


def _pin(device: Any) -> bool:
    """Page-locked loader batches when the pass runs on a CUDA device (faster, asynchronous copies)."""
    text = str(device or "auto")
    return text.startswith("cuda") or (text == "auto" and torch.cuda.is_available())


def _writes() -> bool:
    """Whether this process writes files: always, but under a process group only rank 0."""
    from .distributed import is_writer

    return is_writer()


def _with_progress(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let a command take ``progress=True`` (bars on stderr), ``False``/``None`` (quiet) or a callable."""
    import functools

    from .progress import progress_callback

    @functools.wraps(fn)
    def run(*args: Any, progress: Any = None, **kwargs: Any) -> Any:
        from .distributed import is_writer

        if not is_writer():  # under a process group only rank 0 shows progress
            progress = None
        with progress_callback(progress) as callback:
            return fn(*args, progress=callback, **kwargs)

    return run


def open_model(model: ModelLike, **load_options: Any) -> Source:
    """Load MODEL (path or object) into a :class:`LoadedModel` or :class:`OnnxModel`.

    An ``nn.Module`` is deep-copied (as ``torch.ao.quantization.prepare`` does by default), so that the
    commands never modify the caller's module: the corrected copy is ``Outcome.model``. A
    :class:`LoadedModel` (what this returns) passed to a command is copied the same way, so one opened model
    can serve several commands, each starting from the model as loaded.
    """
    source = _open(model, **load_options)
    if not source.fingerprint:
        source.fingerprint = model_fingerprint(source)
    return source


def model_fingerprint(source: Source) -> str:
    """The fingerprint of MODEL's BN layers (:mod:`bncorrect.fingerprint`), what corrections are checked
    against: equal for a PyTorch model and its ONNX export, different for another checkpoint."""
    from .fingerprint import onnx_fingerprint, torch_fingerprint

    if isinstance(source, OnnxModel):
        return onnx_fingerprint(source.proto)
    return torch_fingerprint(source.model)


def _copy_module(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # e.g. hooks holding locks or open files
        raise UsageError(
            f"cannot copy the model ({type(exc).__name__}: {exc})",
            hint="bncorrect works on a copy of a module passed in; remove what cannot be deep-copied "
            "(hooks, open handles), or save the model and pass its path",
        ) from exc


def _open(model: ModelLike, **load_options: Any) -> Source:
    if isinstance(model, OnnxModel):  # never modified: the rewrite works on a copy of the graph
        return model
    if isinstance(model, LoadedModel):  # opened once, used by several commands: each gets its own copy
        return dataclasses.replace(model, model=_copy_module(model.model))
    if isinstance(model, nn.Module):
        return LoadedModel(_copy_module(model), Path("<in-memory>"), "pickled-module", "")
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        from .models import file_sha256
        from .onnx_rewrite import load_onnx

        if not path.is_file():
            raise ModelLoadError("model file not found", path=path, hint="check the path")
        return OnnxModel(load_onnx(path), path, file_sha256(path))
    return load_model(path, **load_options)


def layer_summaries(source: Source) -> list[dict[str, Any]]:
    """One dict per BN layer (name, type, channels, eps, momentum, correctable, reason, stats)."""
    if isinstance(source, OnnxModel):
        from .onnx_rewrite import find_bn_nodes

        return [ly.summary() for ly in find_bn_nodes(source.proto)]
    return [ly.summary() for ly in find_norm_layers(source.model)]


def correctable_channels(source: Source, *, allow_broken_stats: bool = False) -> dict[str, int]:
    """Name -> channels of every layer that can be corrected; NoBatchNormError when there is none, and
    NumericalError when a layer's stored statistics are NaN, infinite or negative (``allow_broken_stats``:
    count such layers in, for ``recalibrate``, which replaces them)."""
    from .health import STATS_HINT

    layers = layer_summaries(source)
    broken = [ly for ly in layers if ly.get("stats_problem")]
    if broken and not allow_broken_stats:
        first = broken[0]
        more = f" (and {len(broken) - 1} more layers)" if len(broken) > 1 else ""
        raise NumericalError(
            f"BN layer {first['name']}: {first['stats_problem']}{more}; every output of the layer would be "
            "NaN or meaningless",
            path=source.path,
            hint=STATS_HINT,
        )
    if allow_broken_stats:  # only where broken statistics are the one reason
        for ly in broken:
            if ly.get("reason") == ly["stats_problem"]:
                ly["correctable"], ly["reason"] = True, None
    out = {ly["name"]: int(ly["channels"]) for ly in layers if ly["correctable"]}
    if not out:
        path = source.path
        if layers:
            reasons = "; ".join(f"{ly['name']}: {ly['reason']}" for ly in layers[:5])
            raise NoBatchNormError(f"no BatchNorm layer can be corrected ({reasons})", path=path)
        if isinstance(source, OnnxModel):
            from .onnx_rewrite import require_bn_nodes

            require_bn_nodes(source.proto, source=path)  # raises the folded-BN / no-BN explanation
        raise NoBatchNormError(
            "the model has no BatchNorm layer",
            path=path,
            hint="bncorrect corrects BatchNorm layers that keep running statistics; if BN was fused into "
            "the preceding convolutions, load the unfused model",
        )
    return out


def inspect(model: ModelLike, **load_options: Any) -> list[dict[str, Any]]:
    """List the BN layers of MODEL (every layer, correctable or not, with the reason)."""
    source = open_model(model, **load_options)
    layers = layer_summaries(source)
    if not layers:
        correctable_channels(source)  # raises the right "no BN" error
    return layers


@_with_progress
def rule(
    model: ModelLike,
    train_batch_size: int,
    *,
    out: str | Path | None = None,
    export: ExportOptions | None = None,
    progress: Any = None,
    **load_options: Any,
) -> Outcome:
    """EvalNorm's rule of thumb: alpha = beta = 1/B^2 for every BN layer."""
    _check_batch_size("train_batch_size", train_batch_size)
    _check_files(model, out=out)
    source = open_model(model, **load_options)
    a = rule_of_thumb(train_batch_size)
    corrections = Corrections.uniform(
        list(correctable_channels(source)),
        a,
        method="rule-of-thumb",
        train_batch_size=train_batch_size,
        model_sha256=_sha(source),
    )
    return _finish(source, corrections, out, export, progress=progress)


def _check_batch_size(option: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(
            f"{spell(option, value)}: the normalization batch size must be a whole number >= 1",
            hint=f"pass the number of examples each BN layer normalized over in training, e.g. "
            f"{spell(option, 2)}",
        )


def _check_device(device: str | None) -> None:
    """A clean UsageError for a device name torch does not know (``--device banana``)."""
    if device is None or str(device) == "auto":
        return
    try:  # availability is the runtime's to check (torch, or onnxruntime's providers for .onnx)
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(
            f"{spell('device', device)} is not a device ({str(e).splitlines()[0][:120]})",
            hint=f"use {spell('device', 'cpu')}, {spell('device', 'cuda')}, {spell('device', 'cuda:1')}, "
            f"{spell('device', 'mps')} or {spell('device', 'auto')}",
        ) from None


def _path_or_none(value: Any) -> Path | None:
    return Path(value) if isinstance(value, str | Path) else None


def _check_files(model: Any, *, data: Any = None, corrections: Any = None, **writes: Any) -> None:
    """Every output against every input and each other, and each output's folder writable, before any
    work (:func:`bncorrect.paths.check_paths`)."""
    from .paths import check_paths

    if data is not None and not isinstance(data, str | Path):  # an opened Dataset knows its file or folder
        data = getattr(data, "path", None) or getattr(data, "root", None)
    reads = {
        "model": _path_or_none(model) if not isinstance(model, LoadedModel | OnnxModel) else model.path,
        "data": _path_or_none(data) if data is not None else None,
        "corrections": _path_or_none(corrections) if corrections is not None else None,
    }
    check_paths(reads, {k: v for k, v in writes.items() if v is not None})


@_with_progress
def weight(
    model: ModelLike,
    alpha: float | None = None,
    beta: float | None = None,
    *,
    prior_strength: float | None = None,
    out: str | Path | None = None,
    export: ExportOptions | None = None,
    progress: Any = None,
    **load_options: Any,
) -> Outcome:
    """Inference example weighing: one alpha (and beta, default = alpha) for every BN layer.
    ``prior_strength`` N is another spelling of alpha = 1/(N+1): the running statistics weigh as N
    examples against the example's own (:func:`bncorrect.tune.alpha_from_prior_strength`)."""
    if prior_strength is not None:
        from .tune import alpha_from_prior_strength

        if alpha is not None:
            raise UsageError(
                f"{spell('alpha', alpha)} and {spell('prior_strength', prior_strength)} both given",
                hint="give one: the prior strength N means alpha = 1/(N+1)",
            )
        alpha = alpha_from_prior_strength(prior_strength)
    if alpha is None:
        raise UsageError(
            "no alpha given",
            hint=f"give {spell('alpha', 0.1)} or {spell('prior_strength', 9)} (alpha = 1/(N+1))",
        )
    for label, v in (("alpha", alpha), ("beta", beta)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise UsageError(
                f"{spell(label, v)}: must lie in [0, 1]",
                hint="0 is plain BN; small values such as 0.05-0.2 are typical (see sweep-alpha)",
            )
    _check_files(model, out=out)
    source = open_model(model, **load_options)
    corrections = Corrections.uniform(
        list(correctable_channels(source)), alpha, beta, method="example-weighing", model_sha256=_sha(source)
    )
    return _finish(source, corrections, out, export, progress=progress)


@_with_progress
def apply(
    model: ModelLike,
    corrections: str | Path | Corrections,
    *,
    out: str | Path | None = None,
    export: ExportOptions | None = None,
    force: bool = False,
    progress: Any = None,
    **load_options: Any,
) -> Outcome:
    """Apply a corrections file (or :class:`Corrections`) to MODEL. Corrections made for another model
    (their BN fingerprint differs, :mod:`bncorrect.fingerprint`) are refused unless ``force``."""
    _check_files(model, corrections=corrections, out=out)
    corr, corr_path = _read_corrections(corrections)
    source = open_model(model, **load_options)
    warning = corr.check_model(source.fingerprint, model=source.path, source=corr_path, force=force)
    return _finish(
        source, corr, out, export, corrections_source=corr_path, warnings=[warning], progress=progress
    )


def _read_corrections(corrections: str | Path | Corrections) -> tuple[Corrections, Path | None]:
    """A :class:`Corrections` and the file it came from (None for an object passed in)."""
    if isinstance(corrections, Corrections):
        return corrections, None
    path = Path(corrections)
    return load_corrections(path), path


def apply_to_module(
    model: nn.Module, corrections: Corrections, *, source: str | Path | None = None
) -> nn.Module:
    """Validate ``corrections`` against ``model`` and correct it in place (running stats included)."""
    replaced = {n for n, lc in corrections.layers.items() if lc.running_var is not None}
    channels = {
        ly.name: ly.channels
        for ly in find_norm_layers(model)
        if ly.correctable or (getattr(ly, "stats_problem", None) and ly.name in replaced)
    }
    corrections.validate(channels, source=source)
    layers = {ly.name: ly for ly in find_norm_layers(model)}
    for name, lc in corrections.layers.items():
        if lc.running_mean is not None and lc.running_var is not None:
            inner = layers[name].module
            inner = getattr(inner, "norm", inner)
            with torch.no_grad():
                inner.running_mean.copy_(lc.running_mean.to(inner.running_mean))
                inner.running_var.copy_(lc.running_var.to(inner.running_var))
    alpha, beta = corrections.coefficients()
    correct_model(model, alpha, beta, layers=list(corrections.layers))
    return model


def _sha(source: Source) -> str:
    return source.sha256


def _finish(
    source: Source,
    corrections: Corrections,
    out: str | Path | None,
    export: ExportOptions | None,
    *,
    corrections_source: Path | None = None,
    warnings: Sequence[str | None] = (),
    data_pass: bool = False,
    progress: Any = None,
) -> Outcome:
    """Correct the model in memory and, with ``out``, write the result by suffix. The corrections are
    stamped with the fingerprint of the model they are now made for. Under a process group only rank 0
    writes ``out``."""
    from .distributed import is_writer

    if out is not None and not is_writer():
        out = None
    if out is not None:
        out = _check_out(out, source)
    _check_repaired(source, corrections)
    corrections = dataclasses.replace(
        corrections,
        model_fingerprint=source.fingerprint or None,
        model_file=source.path.name if source.path.name != "<in-memory>" else None,
    )
    report: dict[str, Any] = {"warnings": [w for w in warnings if w]}
    if isinstance(source, OnnxModel):
        from .onnx_rewrite import match_layers, rewrite

        mapping = match_layers(source.proto, list(corrections.layers), source=corrections_source)
        report["matched"] = mapping
        node_corr = Corrections(
            {mapping[n]: lc for n, lc in corrections.layers.items()},
            corrections.method,
            corrections.train_batch_size,
            corrections.model_sha256,
            corrections.data,
            corrections.metrics,
            corrections.version,
            corrections.model_fingerprint,
            corrections.model_file,
        )
        channels = correctable_channels(source, allow_broken_stats=True)  # _check_repaired ran above
        node_corr.validate(channels, source=corrections_source)
        alpha, beta = node_corr.coefficients()
        stats = {
            n: (lc.running_mean, lc.running_var)
            for n, lc in node_corr.layers.items()
            if lc.running_mean is not None and lc.running_var is not None
        }
        if export is not None and export.min_effect is not None and out is not None:
            alpha, beta, report["min_effect"] = _min_effect_onnx(source, export, alpha, beta, stats)
        corrected, rw = rewrite(source.proto, alpha, beta, running_stats=stats or None, source=source.path)
        report["rewrite"] = rw
        outcome = Outcome(node_corr, corrected, source, None, report)
        if out is not None:
            outcome.output = _write_onnx_source(outcome, out)
        return outcome
    model = source.model
    apply_to_module(model, corrections, source=corrections_source)
    model.eval()
    outcome = Outcome(corrections, model, source, None, report)
    if out is not None:
        outcome.output = write_output(outcome, out, export, keep_corrections=data_pass, progress=progress)
    return outcome


def _check_budget_options(
    budget: float | None,
    budget_plot: str | Path | None,
    out: str | Path | None,
    metric: str,
    *,
    forward_fn: Any = None,
    metrics: Sequence[str] | None = None,
) -> None:
    from .latency import BUDGET_METRICS, check_budget

    if budget is None and budget_plot is not None:
        raise UsageError(
            f"{spell('budget_plot', 'PNG')} plots the {spell('latency_budget', 'R')} curve, and no budget "
            "is given",
            hint="add --latency-budget R (e.g. 1.2)",
        )
    check_budget(budget, out, metric, BUDGET_METRICS if metrics is None else metrics)
    if budget is not None and forward_fn is not None:
        raise UsageError(
            "latency_budget times the written ONNX graph, which takes the data's first tensor as its one "
            "input, and forward_fn calls the model another way",
            hint="leave forward_fn out (a model of one input), or write the correction without a latency "
            "budget",
        )


def _budget_outputs(outcome: Outcome, plan: Any, budget_plot: str | Path | None) -> None:
    if plan is None:
        return
    outcome.report["latency_budget"] = plan
    if budget_plot is not None and _writes():
        from .latency import plot_budget

        outcome.report["budget_plot"] = plot_budget(plan, budget_plot)


def _labelled_batches(
    dataset: Any, indices: Sequence[int], data_hint: str, batch_size: int = 256
) -> list[tuple[Tensor, Tensor]]:
    """The examples ``indices`` of a map-style labelled dataset, as (inputs, labels) batches: class labels
    (batch,) or masks (batch, H, W). Under a process group, this rank's share (every world-th batch)."""
    from . import distributed

    try:
        items = [dataset[int(i)] for i in indices]
    except TypeError:
        raise UsageError(
            "--latency-budget scores layers on indexable data, and this data cannot be indexed",
            path=getattr(dataset, "path", None),
            hint=f"give a file or folder of examples ({data_hint})",
        ) from None
    xs = [torch.as_tensor(it[0]) for it in items]
    ys = [torch.as_tensor(it[1]).long() for it in items]
    ys = [y.reshape(()) if y.numel() == 1 and y.dim() <= 1 else y for y in ys]
    batches = [
        (torch.stack(xs[i : i + batch_size]).float(), torch.stack(ys[i : i + batch_size]))
        for i in range(0, len(xs), batch_size)
    ]
    return batches[distributed.rank() :: distributed.world_size()]


def _reiterable(batches: Any, data_hint: str) -> Any:
    """``batches`` when it can be read again (a DataLoader, a list), for the budget's scoring passes."""
    if iter(batches) is batches:
        raise UsageError(
            "--latency-budget reads the data again to score the layers, and this iterable of batches can "
            "be read only once",
            hint=f"give a file, a Dataset, a DataLoader or a list of batches ({data_hint})",
        )
    return batches


def _graph_output(plain: Any, module: nn.Module, example: Tensor, output_key: str | int | None) -> int | None:
    """The index of the exported graph's output that holds what the PyTorch sweep scores (``output_key``'s
    entry of the model's output), found by running both on ``example``; None for a single-tensor output."""
    from .onnx_passes import GraphRunner
    from .sweep import select_output

    with torch.no_grad():
        out = module(example)
    if isinstance(out, Tensor):
        return None
    want = select_output(out, output_key, rows=int(example.shape[0]))
    names = [o.name for o in plain.graph.output]
    got = GraphRunner(plain, names, device="cpu").run(example)
    hits = [
        i
        for i, v in enumerate(got)
        if tuple(v.shape) == tuple(want.shape)
        and torch.allclose(v.float(), want.float(), rtol=1e-3, atol=1e-4)
    ]
    if len(hits) != 1:
        raise UsageError(
            f"--latency-budget scores the exported graph, and {len(hits)} of its outputs match the model's "
            f"output {output_key!r}",
            hint="give a model whose scored output is one tensor (or one dict entry with --output-key)",
        )
    return hits[0]


def _latency_budget(
    source: Source,
    corrections: Corrections,
    budget: float,
    batches: Any,
    metric: str,
    *,
    latency: Any = None,
    progress: Any = None,
    scored_on: str = "held-out",
    device: str = "cpu",
    output_key: str | int | None = None,
    ignore_index: int = 255,
    segmentation: bool = False,
    data_hint: str = "",
    selection: str = "exact",
) -> tuple[Corrections, Any]:
    """``--latency-budget``: the corrections with the layers not worth their latency reset to plain BN
    (alpha = beta = 0, new statistics kept), and the :class:`~bncorrect.latency.BudgetReport`. The
    layers are scored on ``batches`` (labelled, read twice) in onnxruntime on the plain graph (MODEL, or
    its export with BN kept): the sweep graph of :func:`bncorrect.onnx_passes.sweep_onnx`, one session, the
    subsets of a pass fed as candidates (measured faster than one session per subset, and than the
    stacked PyTorch sweep, benchmarks/README.md); ``segmentation``: per-pixel outputs are scored too."""
    from . import distributed
    from .latency import corrected_names, plan_budget, subset_graph, sweep_scorer
    from .onnx_passes import sweep_onnx
    from .onnx_rewrite import match_layers
    from .passes import first_tensor

    example = None
    for batch in batches:
        t = first_tensor(batch)
        example = None if t is None else t[:64].detach().cpu()
        break
    example = distributed.broadcast(example)
    if example is None or example.shape[0] == 0:
        raise UsageError("--latency-budget needs held-out examples to score the layers, and there are none")
    graph_key = output_key
    if isinstance(source, OnnxModel):
        plain, path = source.proto, source.path
    else:
        from .layers import as_batchnorm, strip_corrections
        from .onnx_export import export_plain

        module = as_batchnorm(strip_corrections(copy.deepcopy(source.model))).cpu().eval()
        plain, path = export_plain(module, example), None
        graph_key = _graph_output(plain, module, example, output_key)
    mapping = match_layers(plain, list(corrections.layers))
    alpha = {mapping[n]: lc.alpha for n, lc in corrections.layers.items()}
    beta = {mapping[n]: lc.beta for n, lc in corrections.layers.items()}
    stats = {
        mapping[n]: (lc.running_mean, lc.running_var)
        for n, lc in corrections.layers.items()
        if lc.running_mean is not None and lc.running_var is not None
    }

    def step(_: str, done: int, total: int | None) -> None:
        if progress is not None:
            progress("latency budget: scoring", done, total)

    def sweep(candidates: Sequence[Any]) -> Any:
        return sweep_onnx(
            plain,
            batches,
            [],
            extra_candidates=candidates,
            metric=metric,
            output_key=graph_key,
            ignore_index=ignore_index,
            device=device,
            progress=step,
            data_hint=data_hint,
            source=path,
        )

    plan = plan_budget(
        corrected_names(alpha, beta),
        sweep_scorer(sweep, alpha, beta, stats, metric, segmentation=segmentation),
        lambda nodes: subset_graph(plain, alpha, beta, stats, nodes),
        example.numpy(),
        metric,
        budget,
        latency=latency,
        selection=selection,
        progress=progress,
    ).renamed({node: name for name, node in mapping.items()})
    plan.scored_on = scored_on
    keep = set(plan.selected)
    layers = {
        name: lc
        if name in keep
        else dataclasses.replace(lc, alpha=torch.zeros_like(lc.alpha), beta=torch.zeros_like(lc.beta))
        for name, lc in corrections.layers.items()
    }
    chosen = dataclasses.replace(corrections, layers=layers)
    chosen.metrics = {**(corrections.metrics or {}), "latency_budget": plan.summary()}
    return chosen, plan


def _check_repaired(source: Source, corrections: Corrections) -> None:
    """A layer whose stored statistics are broken (NaN, Inf, negative variance) may only be written when
    the corrections replace them (a recalibration); anything else would write a model that outputs NaN."""
    from .health import STATS_HINT

    broken = {ly["name"]: ly for ly in layer_summaries(source) if ly.get("stats_problem")}
    if not broken:
        return
    replaced = {n for n, lc in corrections.layers.items() if lc.running_var is not None}
    if isinstance(source, OnnxModel) and replaced:
        from .onnx_rewrite import match_layers

        mapping = match_layers(source.proto, sorted(replaced))
        replaced = set(mapping.values())
    left = [n for n in broken if n not in replaced]
    if left:
        first = broken[left[0]]
        raise NumericalError(
            f"BN layer {first['name']}: {first['stats_problem']}; the corrections do not replace these "
            "statistics, so the written model would output NaN or meaningless values",
            path=source.path,
            hint=STATS_HINT,
        )


def _min_effect_onnx(
    source: OnnxModel,
    export: ExportOptions,
    alpha: Mapping[str, Any],
    beta: Mapping[str, Any],
    stats: Mapping[str, tuple[Tensor, Tensor]],
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``--min-effect`` on an ONNX source: drop the corrections that barely change their layer on the data."""
    from .onnx_export import min_effect_filter

    _require_probe(export)
    effect = min_effect_filter(
        source.proto, alpha, beta, export.example_input, export.min_effect or 0.0, running_stats=stats
    )
    return effect.filter(alpha), effect.filter(beta), effect


def _require_probe(export: ExportOptions) -> None:
    if export.example_input is None:
        raise UsageError(
            "--min-effect judges each layer's correction on data, and this command reads none",
            hint="use --min-effect with estimate or sweep-alpha (they pass their first data batch)",
        )


def _check_out(out: str | Path, source: Source) -> Path:
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UsageError(
            f"cannot tell what to write from the suffix {suffix or '(none)'!r}",
            path=out,
            hint="OUT must end in .safetensors (corrections only), .pt/.pth (patched checkpoint) or "
            ".onnx (graph with rewritten normalization)",
        )
    if isinstance(source, OnnxModel) and suffix in (".pt", ".pth"):
        raise UsageError(
            "cannot write a PyTorch checkpoint from an ONNX model",
            path=out,
            hint="write .onnx (rewritten graph) or .safetensors (corrections file)",
        )
    from .paths import check_paths

    return check_paths({"model": source.path if source.path.exists() else None}, {"out": out})["out"]


def _write_onnx_source(outcome: Outcome, out: Path) -> Path:
    from .onnx_rewrite import save_onnx

    if out.suffix.lower() == ".safetensors":
        return save_corrections(outcome.corrections, out)
    return save_onnx(outcome.model, out, report=outcome.report.get("rewrite"))


def write_output(
    outcome: Outcome,
    out: str | Path,
    export: ExportOptions | None = None,
    *,
    keep_corrections: bool = False,
    progress: Any = None,
) -> Path:
    """Write a corrected PyTorch model by OUT's suffix (corrections file, checkpoint, or ONNX).
    ``keep_corrections`` (the corrections came from a pass over data): when the ONNX export fails, save
    them beside OUT first, so the pass is not lost."""
    out = Path(out)
    suffix = out.suffix.lower()
    source = outcome.source
    if isinstance(source, OnnxModel):
        return _write_onnx_source(outcome, out)
    if suffix == ".safetensors":
        return save_corrections(outcome.corrections, out)
    if suffix in (".pt", ".pth"):
        meta = {
            "method": outcome.corrections.method,
            "train_batch_size": outcome.corrections.train_batch_size,
            "model_fingerprint": outcome.corrections.model_fingerprint,
        }
        return save_checkpoint(outcome.model, out, source=source, meta=meta)
    export = export or ExportOptions()
    if export.min_effect is not None:
        _require_probe(export)
    example = _example_input(export, source)
    from .onnx_export import export_onnx

    try:
        report = export_onnx(
            outcome.model,
            example,
            out,
            opset=export.opset,
            dynamic_batch=export.dynamic_batch,
            verify=export.verify,
            min_effect=export.min_effect,
            progress=progress,
        )
    except OnnxError as e:  # keep what the pass computed: corrections first, derived artefacts after
        if not keep_corrections:
            raise
        raise _with_saved_corrections(e, outcome.corrections, out) from None
    outcome.report["export"] = report
    outcome.report.setdefault("warnings", []).extend(report.notes)
    return out


def _with_saved_corrections(error: OnnxError, corrections: Corrections, out: Path) -> OnnxError:
    """``error`` (ONNX export or verification failed) after saving the corrections beside OUT as
    ``<OUT>.safetensors`` (never over an existing file), with the message saying where and what next."""
    fallback = out.with_suffix(".safetensors")
    if fallback.exists():
        saved = f"the corrections were not saved: {fallback} exists already"
        next_step = f"write them with -o {fallback.with_name(fallback.stem + '-corrections.safetensors')}"
    else:
        save_corrections(corrections, fallback)
        saved = f"the corrections were saved to {fallback}"
        next_step = (
            "export the model to ONNX yourself (BN kept: torch.onnx.export(..., dynamo=True, "
            f"optimize=False)) and run `bncorrect apply that.onnx {fallback} -o {out}`"
        )
    hint = f"{error.hint}; or {next_step}" if error.hint else next_step
    return type(error)(f"{error.message}; {saved}", path=error.path, hint=hint, detail=error.detail)


def _example_input(export: ExportOptions, source: LoadedModel) -> Tensor:
    if export.example_input is not None:
        return export.example_input
    shape = export.input_shape or source.meta.get("input_shape")
    if not shape:
        raise UsageError(
            "writing ONNX from a PyTorch model needs an example input shape",
            hint="pass --input-shape, e.g. --input-shape 1,3,224,224 (or --data for commands that read data)",
        )
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*[int(s) for s in shape], generator=gen)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``--input-shape 1,3,224,224``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UsageError(
            f"--input-shape {text!r} is not a list of positive integers",
            hint="give the example input's shape, batch first, e.g. --input-shape 1,3,224,224",
        )
    return shape


def corrections_from_model(model: nn.Module, *, method: str, **meta: Any) -> Corrections:
    """Read the alpha/beta of every corrected layer back into a :class:`Corrections`."""
    layers = {
        n: LayerCorrection(m.alpha.detach().cpu().clone(), m.beta.detach().cpu().clone())
        for n, m in corrected_layers(model).items()
    }
    return Corrections(layers, method, **meta)


# ---------------------------------------------------------------- commands that read data
def _on_runtime(
    source: Source,
    torch_fn: Callable[..., Any],
    onnx_fn: str,
    *args: Any,
    forward_fn: Any = None,
    onnx_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Run a pass over data on MODEL's runtime: ``torch_fn(model, *args, forward_fn=..., **kwargs)`` for a
    PyTorch model, its onnxruntime twin ``bncorrect.onnx_passes.<onnx_fn>(graph, *args, source=path,
    **onnx_kwargs, **kwargs)`` for an ONNX graph (imported only then: it loads onnxruntime)."""
    if isinstance(source, OnnxModel):
        from . import onnx_passes

        run = getattr(onnx_passes, onnx_fn)
        return run(source.proto, *args, source=source.path, **(onnx_kwargs or {}), **kwargs)
    return torch_fn(source.model, *args, forward_fn=forward_fn, **kwargs)


def open_data(data: Any, spec: Any = None) -> Any:
    """What the commands read data from, as people pass it: a path (``--data``), a tensor or numpy array
    ``x`` (N, ...), a tuple ``(x,)`` / ``(x, y)`` of them, a :class:`~bncorrect.data.Dataset`, any map-style
    ``torch.utils.data.Dataset``, a ``DataLoader`` or any iterable of batches (tuples, lists or dicts; give
    ``forward_fn`` for batches the model does not take as ``model(batch[0])``)."""
    from .data import from_arrays, load_data

    if isinstance(data, str | Path):
        return load_data(data, spec)
    if isinstance(data, Tensor | np.ndarray):
        return from_arrays(data)
    if (
        isinstance(data, tuple)
        and len(data) in (1, 2)
        and all(isinstance(a, Tensor | np.ndarray) for a in data)
    ):
        return from_arrays(*data)
    return data


#: Commands whose normalization groups of B must be random draws, as in training (estimate, diagnose,
#: recalibrate --upstream train): a class-sorted loader would bias them.
_NEEDS_SHUFFLE = "normalization groups of B consecutive examples must be random draws, as in training"


def _loader(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int,
    max_examples: int | None,
    pin_memory: bool = False,
) -> tuple[Iterable[Any], int | None, str]:
    """Batches over ``dataset``: a Dataset (bncorrect's, or any map-style torch Dataset) is wrapped in a
    seeded, optionally shuffled loader; a DataLoader or other iterable of batches is used as it is (with a
    warning when ``shuffle`` is needed but the loader reads in order)."""
    import warnings

    from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, Subset
    from torch.utils.data import Dataset as TorchDataset

    from . import distributed
    from .data import Dataset, make_loader

    # under a process group every rank reads its shard of the seeded order (distributed.shard_order):
    # whole loader batches, so normalization groups of B never straddle two ranks
    rank, world = distributed.rank(), distributed.world_size()
    if isinstance(dataset, Dataset):
        loader = make_loader(
            dataset,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            num_workers=num_workers,
            max_examples=max_examples,
            shard=(rank, world),
            pin_memory=pin_memory,
        )
        total = len(loader.dataset)  # type: ignore[arg-type]
        return loader, total, dataset.description
    if isinstance(dataset, TorchDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
            if shuffle
            else range(n)
        )
        if max_examples is not None:
            order = list(order)[:max_examples]
        order = distributed.shard_order(list(order), batch_size, rank, world)
        loader = DataLoader(
            Subset(dataset, list(order)),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        return loader, len(order), f"{type(dataset).__name__} of {n} examples"
    if world > 1 and not (
        isinstance(dataset, DataLoader) and isinstance(dataset.sampler, DistributedSampler)
    ):
        # batches already made (a DataLoader, an iterable): every world-th batch; a DataLoader with a
        # DistributedSampler is this rank's shard already
        return (
            distributed.ShardedBatches(dataset, rank, world),
            None,
            f"{type(dataset).__name__} (rank {rank} of {world}: batches {rank}, {rank} + {world}, ...)",
        )
    if isinstance(dataset, DataLoader):
        if shuffle and isinstance(dataset.sampler, SequentialSampler):
            warnings.warn(
                f"the DataLoader reads its data in order, but {_NEEDS_SHUFFLE}: a loader sorted by class "
                "biases the result; pass DataLoader(..., shuffle=True), or the Dataset itself (bncorrect "
                "then shuffles it with the seed)",
                UserWarning,
                stacklevel=4,
            )
        total = len(dataset.dataset) if hasattr(dataset.dataset, "__len__") else None  # type: ignore[arg-type]
        if max_examples is not None:
            total = None if total is None else min(total, max_examples)
        return dataset, total, f"DataLoader of {type(dataset.dataset).__name__}"
    if isinstance(dataset, str | bytes) or not hasattr(dataset, "__iter__"):
        raise UsageError(
            f"cannot read data from a {type(dataset).__name__}",
            hint="pass a path, a tensor x, a tuple (x, y), a Dataset, a DataLoader or an iterable of batches",
        )
    return dataset, None, type(dataset).__name__


def _require_torch(source: Source, command: str) -> LoadedModel:
    if isinstance(source, OnnxModel):
        raise OnnxError(
            f"{command} runs on PyTorch models for now",
            path=source.path,
            hint=f"run {command} on the PyTorch checkpoint and `bncorrect apply {source.path.name} "
            "CORRECTIONS.safetensors -o corrected.onnx` (layers are matched by parameter names)",
        )
    return source


def _onnx_options(source: Source, command: str, forward_fn: Any) -> bool:
    """True for an ONNX source (run through onnxruntime, bncorrect.onnx_passes); refuses what only a
    PyTorch model can take."""
    if not isinstance(source, OnnxModel):
        return False
    if forward_fn is not None:
        raise UsageError(
            f"{command}: forward_fn calls a PyTorch model; an ONNX graph is fed the data's first tensor as "
            "its one input",
            path=source.path,
            hint="leave forward_fn out, or run on the PyTorch model",
        )
    return True


@_with_progress
def estimate(
    model: ModelLike,
    data: Any,
    train_batch_size: int,
    *,
    out: str | Path | None = None,
    layer_batch_size: Mapping[str, int] | None = None,
    recalibrate_first: bool = False,
    upstream: str = "eval",
    max_examples: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    seed: int = 0,
    data_spec: Any = None,
    forward_fn: Any = None,
    sample_budget: int | None = None,
    progress: Any = None,
    export: ExportOptions | None = None,
    **load_options: Any,
) -> Outcome:
    """Offline EvalNorm: per-layer alpha/beta minimising L_aux over a data pass (DESIGN §3).

    With ``recalibrate_first`` the running statistics are first replaced by exact population statistics
    (:func:`recalibrate`), and alpha/beta are estimated against them. An ONNX model runs in onnxruntime
    (:mod:`bncorrect.onnx_passes`; layers are BN node names, ``layer_batch_size`` globs match them).
    """
    from .estimation import DEFAULT_SAMPLE_BUDGET, estimate_alpha_beta
    from .passes import lcm

    _check_batch_size("train_batch_size", train_batch_size)
    for pattern, b in (layer_batch_size or {}).items():
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            _bad_layer_b(pattern, b)
    if recalibrate_first:
        _check_upstream(upstream)
    _check_device(device)
    _check_files(model, data=data, out=out)
    if out is not None:
        out = Path(out)
    source = open_model(model, **load_options)
    is_onnx = _onnx_options(source, "estimate", forward_fn)
    if out is not None:
        _check_out(out, source)
    channels = correctable_channels(source)
    _check_layer_patterns(layer_batch_size, channels, source)
    dataset = open_data(data, data_spec)
    recal = None
    if recalibrate_first:
        recal = _recalibrate_stats(
            source,
            dataset,
            upstream,
            train_batch_size,
            max_examples,
            device,
            num_workers,
            seed,
            forward_fn,
            progress,
        )
        if not is_onnx:
            set_running_stats(source.model, recal.stats)
    sizes = [*(layer_batch_size or {}).values(), train_batch_size]
    multiple = lcm(sizes)
    batch = multiple * max(1, 64 // multiple)
    loader, total, description = _loader(
        dataset,
        batch,
        shuffle=True,
        seed=seed,
        num_workers=num_workers,
        max_examples=max_examples,
        pin_memory=_pin(device),
    )
    result = _on_runtime(
        source,
        estimate_alpha_beta,
        "estimate_onnx",
        loader,
        train_batch_size,
        forward_fn=forward_fn,
        onnx_kwargs={"running_stats": None if recal is None else recal.stats},
        layer_batch_size=layer_batch_size,
        device=device,
        seed=seed,
        sample_budget=sample_budget or DEFAULT_SAMPLE_BUDGET,
        total_examples=total,
        progress=progress,
        data_hint=description,
    )
    layers = {
        ly.name: LayerCorrection(
            torch.tensor(ly.alpha),
            torch.tensor(ly.beta),
            None if recal is None else recal.stats[ly.name][0],
            None if recal is None else recal.stats[ly.name][1],
        )
        for ly in result.layers
        if ly.name in channels
    }
    metrics: dict[str, Any] = {
        "examples": result.examples,
        "dropped": result.dropped,
        "seed": seed,
        "layers": {ly.name: {"l_aux_ema": ly.l_aux_ema, "l_aux": ly.l_aux} for ly in result.layers},
    }
    if layer_batch_size:
        metrics["layer_batch_size"] = dict(layer_batch_size)
    if recal is not None:
        metrics["recalibrated"] = recal.upstream
    corrections = Corrections(
        layers,
        "evalnorm-offline" + ("+recalibrate" if recal is not None else ""),
        train_batch_size,
        source.sha256,
        description,
        metrics,
    )
    export = export or ExportOptions()
    if not is_onnx and export.example_input is None and export.input_shape is None:
        export.example_input = _first_input(loader)
    outcome = _finish(source, corrections, out, export, data_pass=True, progress=progress)
    outcome.report["estimate"] = result
    if recal is not None:
        outcome.report["recalibrate"] = recal
    return outcome


def _bad_layer_b(pattern: str, value: Any) -> None:
    raise UsageError(
        f"layer_batch_size {pattern!r}: {value!r} is not a normalization batch size (a whole number >= 1)",
        hint="e.g. --layer-batch-size 'head.*=16' on the command line, "
        "layer_batch_size={'head.*': 16} in Python",
    )


def _check_layer_patterns(
    patterns: Mapping[str, int] | None, channels: Mapping[str, int], source: Source
) -> None:
    """Every ``layer_batch_size`` pattern must match a layer: one that matches none is a typo, and
    silently ignoring it would estimate that layer with the wrong B."""
    import fnmatch

    names = list(channels)
    if isinstance(source, LoadedModel):  # layers that use batch statistics are grouped by B too
        from .layers import batch_statistics_layers

        names += list(batch_statistics_layers(source.model))
    for pattern in patterns or {}:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(list(channels)[:6]) + (" ..." if len(channels) > 6 else "")
            raise UsageError(
                f"layer_batch_size pattern {pattern!r} matches no BN layer (the layers: {shown})",
                path=source.path,
                hint="patterns are globs on layer names (BN node names for .onnx), e.g. 'head.*'; see "
                "`bncorrect inspect MODEL`",
            )


def _check_upstream(upstream: str) -> None:
    if upstream not in ("eval", "train"):
        raise UsageError(
            f"{spell('upstream', upstream)}: must be 'eval' (inference-consistent) or 'train' (PreciseBN)",
            hint=f"{spell('upstream', 'eval')} (the default) or {spell('upstream', 'train')} with "
            f"{spell('batch_size', 8)}",
        )


def _first_input(batches: Iterable[Any]) -> Tensor | None:
    from .passes import first_tensor

    for batch in batches:
        t = first_tensor(batch)
        return None if t is None else t[:2].detach().cpu().clone()
    return None


def _recalibrate_stats(
    source: Source,
    dataset: Any,
    upstream: str,
    batch_size: int | None,
    max_examples: int | None,
    device: str,
    num_workers: int,
    seed: int,
    forward_fn: Any,
    progress: Any,
    *,
    exact: bool | None = None,
    tolerance: float | None = None,
    max_passes: int | None = None,
) -> Any:
    """The recalibrated statistics (:class:`~bncorrect.recalibration.RecalibrateResult`) on MODEL's runtime;
    ``exact``, ``tolerance`` and ``max_passes`` choose and stop the inference-consistent scheme (defaults:
    :func:`~bncorrect.recalibration.choose_exact`, :data:`~bncorrect.recalibration.DEFAULT_TOLERANCE`,
    :data:`~bncorrect.recalibration.DEFAULT_MAX_PASSES`)."""
    from .recalibration import (
        DEFAULT_MAX_PASSES,
        DEFAULT_TOLERANCE,
        check_iteration,
        choose_exact,
        recalibrate_stats,
    )

    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    max_passes = DEFAULT_MAX_PASSES if max_passes is None else max_passes
    if upstream == "eval" and not exact:
        check_iteration(tolerance, max_passes)
    if upstream == "train":
        if batch_size is None:
            raise UsageError(
                f"{spell('upstream', 'train')} needs the normalization batch size of training",
                hint=f"pass {spell('batch_size', 8)} (the examples each BN layer normalized over), or use "
                f"{spell('upstream', 'eval')}",
            )
        loader_batch = batch_size * max(1, 64 // batch_size)
    elif exact:
        loader_batch = 128
    else:
        # the iterative scheme settles in fewer passes the more examples a batch holds (all of the data in
        # one batch: exact after pass 1, benchmarks/README.md): batches of about 4M input values, 128 to
        # 4096 examples
        loader_batch = 128
        values = 0
        if hasattr(dataset, "example_shape"):  # bncorrect's datasets
            values = int(np.prod(dataset.example_shape()))
        elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
            first = dataset[0]
            x = first[0] if isinstance(first, tuple | list) else first
            values = x.numel() if isinstance(x, Tensor) else 0
        if values:
            loader_batch = min(4096, max(128, (1 << 22) // values))
    loader, total, description = _loader(
        dataset,
        loader_batch,
        shuffle=upstream == "train",
        seed=seed,
        num_workers=num_workers,
        max_examples=max_examples,
        pin_memory=_pin(device),
    )
    if upstream == "eval" and exact is None:
        try:
            n_batches: int | None = len(loader)  # type: ignore[arg-type]
        except TypeError:
            n_batches = None
        from . import distributed

        if distributed.active():  # every rank must choose the same scheme: from the batches of all ranks
            counts = distributed.all_gather(n_batches)
            n_batches = None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
        n_layers = len(correctable_channels(source, allow_broken_stats=True))
        exact = choose_exact(n_layers, n_batches, max_passes)
    return _on_runtime(
        source,
        recalibrate_stats,
        "recalibrate_onnx",
        loader,
        forward_fn=forward_fn,
        upstream=upstream,
        batch_size=batch_size,
        exact=exact,
        tolerance=tolerance,
        max_passes=max_passes,
        device=device,
        total_examples=total,
        progress=progress,
        data_hint=description,
    )


@_with_progress
def recalibrate(
    model: ModelLike,
    data: Any,
    *,
    out: str | Path | None = None,
    upstream: str = "eval",
    batch_size: int | None = None,
    exact: bool | None = None,
    tolerance: float | None = None,
    max_passes: int | None = None,
    max_examples: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    seed: int = 0,
    data_spec: Any = None,
    forward_fn: Any = None,
    progress: Any = None,
    export: ExportOptions | None = None,
    **load_options: Any,
) -> Outcome:
    """Replace every BN layer's running statistics by exact population statistics over ``data`` (an ONNX
    model runs in onnxruntime, :mod:`bncorrect.onnx_passes`).

    ``upstream="eval"`` (inference-consistent) runs one of the two schemes of
    :mod:`bncorrect.recalibration`: ``exact=False`` the iterative one (full passes until the largest
    relative change is at most ``tolerance``, default 1e-4, at most ``max_passes``, default 10; a warning
    when it stops at the cap), ``exact=True`` one partial pass per layer (about L/2 full passes for L
    layers); by default (``None``) the layer-by-layer one when it costs no more than ``max_passes`` full
    passes and the data is more than one batch, else the iterative one
    (:func:`~bncorrect.recalibration.choose_exact`)."""
    _check_upstream(upstream)
    _check_batch_size("batch_size", batch_size)
    _check_device(device)
    _check_files(model, data=data, out=out)
    if out is not None:
        out = Path(out)
    source = open_model(model, **load_options)
    is_onnx = _onnx_options(source, "recalibrate", forward_fn)
    if out is not None:
        _check_out(out, source)
    channels = correctable_channels(source, allow_broken_stats=True)
    dataset = open_data(data, data_spec)
    recal = _recalibrate_stats(
        source,
        dataset,
        upstream,
        batch_size,
        max_examples,
        device,
        num_workers,
        seed,
        forward_fn,
        progress,
        exact=exact,
        tolerance=tolerance,
        max_passes=max_passes,
    )
    warnings = []
    if not recal.converged:
        warnings.append(
            f"the iterative inference-consistent recalibration stopped after {recal.passes} passes with a "
            f"change of {recal.max_change:.3g} in the last one, above the tolerance {recal.tolerance:g}: "
            f"give it more passes ({spell('max_passes', 2 * recal.passes)}) or use the exact "
            f"layer-by-layer scheme ({spell('exact')})"
        )
    existing = {} if is_onnx else {n: (m.alpha, m.beta) for n, m in corrected_layers(source.model).items()}
    zero = torch.tensor(0.0)
    layers = {
        name: LayerCorrection(*existing.get(name, (zero, zero)), mean, var)
        for name, (mean, var) in recal.stats.items()
        if name in channels
    }
    description = getattr(dataset, "description", type(dataset).__name__)
    corrections = Corrections(
        layers,
        f"recalibrate-{upstream}",
        batch_size,
        source.sha256,
        description,
        {
            "examples": recal.examples,
            "passes": recal.passes,
            "upstream": upstream,
            **(
                {"scheme": recal.scheme, "max_change": recal.max_change, "exact": recal.exact}
                if upstream == "eval"
                else {}
            ),
        },
    )
    export = export or ExportOptions()
    if (
        not is_onnx
        and export.example_input is None
        and export.input_shape is None
        and hasattr(dataset, "__getitem__")
    ):
        export.example_input = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))])
    outcome = _finish(source, corrections, out, export, warnings=warnings, data_pass=True, progress=progress)
    outcome.report["recalibrate"] = recal
    return outcome


@_with_progress
def diagnose(
    model: ModelLike,
    data: Any,
    train_batch_size: int,
    *,
    corrections: str | Path | Corrections | None = None,
    plot: str | Path | None = None,
    histogram_layer: str | None = None,
    force: bool = False,
    max_examples: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    seed: int = 0,
    data_spec: Any = None,
    forward_fn: Any = None,
    progress: Any = None,
    **load_options: Any,
) -> Any:
    """Per-layer gap between eval-mode and training-mode normalization (and after ``corrections``)."""
    from .diagnosis import diagnose_model, plot_diagnosis

    _check_batch_size("train_batch_size", train_batch_size)
    _check_device(device)
    _check_files(model, data=data, corrections=corrections, plot=plot)
    source = _require_torch(open_model(model, **load_options), "diagnose")
    channels = correctable_channels(source)
    coeffs = None
    warnings = []
    if corrections is not None:
        corr, corr_path = _read_corrections(corrections)
        warnings.append(
            corr.check_model(source.fingerprint, model=source.path, source=corr_path, force=force)
        )
        corr.validate(channels, source=corr_path)
        coeffs = {n: (lc.alpha, lc.beta) for n, lc in corr.layers.items()}
    if plot is not None:
        plot = Path(plot)
    dataset = open_data(data, data_spec)
    batch = train_batch_size * max(1, 64 // train_batch_size)
    loader, total, description = _loader(
        dataset,
        batch,
        shuffle=True,
        seed=seed,
        num_workers=num_workers,
        max_examples=max_examples,
        pin_memory=_pin(device),
    )
    result = diagnose_model(
        source.model,
        loader,
        train_batch_size,
        corrections=coeffs,
        histogram=histogram_layer if histogram_layer else plot is not None,
        forward_fn=forward_fn,
        device=device,
        total_examples=total,
        progress=progress,
        data_hint=description,
    )
    if plot is not None and _writes():
        plot_diagnosis(result, str(plot))
    result.warnings = [w for w in warnings if w]
    return result


@_with_progress
def sweep_alpha(
    model: ModelLike,
    data: Any,
    *,
    alphas: Sequence[float] | None = None,
    beta_mode: Any = "equal",
    train_batch_size: int | None = None,
    prior_strengths: Sequence[float] | None = None,
    corrections: str | Path | Corrections | None = None,
    metric: str = "nll",
    output_key: str | int | None = None,
    ignore_index: int = 255,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    report: str | Path | None = None,
    max_examples: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    seed: int = 0,
    data_spec: Any = None,
    forward_fn: Any = None,
    progress: Any = None,
    export: ExportOptions | None = None,
    force: bool = False,
    latency_budget: float | None = None,
    budget_plot: str | Path | None = None,
    latency_fn: Any = None,
    budget_selection: str = "exact",
    **load_options: Any,
) -> Outcome:
    """Inference example weighing: evaluate a grid of global alphas (plus EMA, the rule 1/B^2 and an
    optional corrections file) on labelled data and choose the best for ``metric``; with ``out`` the chosen
    correction is written. ``outcome.report["sweep"]`` is the :class:`~bncorrect.sweep.SweepResult`. An ONNX
    model runs in onnxruntime (:mod:`bncorrect.onnx_passes`; a corrections file made for its PyTorch
    original is matched by BN parameter names).

    Segmentation: with masks ``y`` (N, H, W) in the data and per-pixel logits (N, K, H, W) from the model (a
    dict's entry chosen by ``output_key``, e.g. ``"out"`` for torchvision) the sweep reports pixel-nll,
    miou and pixel-acc over the pixels whose mask value is not ``ignore_index`` and chooses by ``metric``
    (``"nll"`` means pixel-nll; see :mod:`bncorrect.sweep`). Detection models cannot be swept.

    ``prior_strengths`` (N values) is another spelling of the grid: alpha = 1/(N+1) each, instead of
    ``alphas``.

    ``latency_budget`` R (OUT ``.onnx``): correct only the layers worth their latency: per layer the
    leave-one-out gain on the data (classification or segmentation metric) and the onnxruntime cost, the
    exact additive Pareto frontier of subsets, each measured as a real graph, and the best measured one
    whose latency ratio stays <= R is written (:mod:`bncorrect.latency`;
    ``outcome.report["latency_budget"]``, ``budget_plot`` PNG; ``latency_fn`` replaces the latency
    measurement, e.g. with a cost model; ``budget_selection="greedy"`` measures the greedy prefixes
    instead, for comparison)."""
    from .sweep import METRICS, SEGMENTATION_METRICS, Candidate, plot_sweep, write_report
    from .sweep import sweep_alpha as run_sweep

    if prior_strengths is not None:
        from .tune import alphas_from_prior_strengths

        if alphas is not None:
            raise UsageError(
                f"{spell('alphas', 'LIST')} and {spell('prior_strengths', 'LIST')} both given",
                hint="give one grid: the prior strengths N mean alphas 1/(N+1)",
            )
        alphas = alphas_from_prior_strengths(prior_strengths)

    _check_batch_size("train_batch_size", train_batch_size)
    _check_device(device)
    _check_files(
        model, data=data, corrections=corrections, out=out, plot=plot, report=report, budget_plot=budget_plot
    )
    metrics = (*METRICS, *SEGMENTATION_METRICS)
    _check_budget_options(latency_budget, budget_plot, out, metric, forward_fn=forward_fn, metrics=metrics)
    source = open_model(model, **load_options)
    is_onnx = _onnx_options(source, "sweep-alpha", forward_fn)
    if out is not None:
        _check_out(out, source)
    channels = correctable_channels(source)
    extra = []
    warnings = []
    if corrections is not None:
        corr, corr_path = _read_corrections(corrections)
        warnings.append(
            corr.check_model(source.fingerprint, model=source.path, source=corr_path, force=force)
        )
        if isinstance(source, OnnxModel):
            from .onnx_passes import node_corrections

            corr = node_corrections(source.proto, corr, source=corr_path)
        corr.validate(channels, source=corr_path)
        extra.append(Candidate.from_corrections(corr))
    dataset = open_data(data, data_spec)
    if getattr(dataset, "has_labels", True) is False:
        from .errors import DataError

        raise DataError(
            "sweep-alpha needs labels, and this data has none",
            path=getattr(dataset, "path", None),
            hint="give .npz/.pt/.safetensors with a 'y' array (class labels (N,) or segmentation masks "
            "(N, H, W)), or image folders with one folder per class",
        )
    # masks: batches of about 4M labelled pixels (a batch's maps are evaluated for every candidate)
    pixels = int(np.prod(getattr(dataset, "label_shape", ()) or (1,)))
    batch_size = 256 if pixels <= 1 else max(1, min(256, (1 << 22) // pixels))
    loader, total, description = _loader(
        dataset,
        batch_size,
        shuffle=False,
        seed=seed,
        num_workers=num_workers,
        max_examples=max_examples,
        pin_memory=_pin(device),
    )
    result = _on_runtime(
        source,
        run_sweep,
        "sweep_onnx",
        loader,
        alphas,
        forward_fn=forward_fn,
        beta_mode=beta_mode,
        train_batch_size=train_batch_size,
        extra_candidates=extra,
        metric=metric,
        output_key=output_key,
        ignore_index=ignore_index,
        device=device,
        total_examples=total,
        progress=progress,
        data_hint=description,
    )
    best = result.best
    chosen = Corrections.uniform(
        list(channels),
        float(best.alpha or 0.0),
        float(best.beta if best.beta is not None else best.alpha or 0.0),
        method=f"example-weighing-sweep ({result.metric})",
        train_batch_size=train_batch_size,
        model_sha256=source.sha256,
    )
    chosen.data = description
    chosen.metrics = {"metric": result.metric, "best": best.as_dict(), "n_examples": result.n_examples}
    export = export or ExportOptions()
    if not is_onnx and export.example_input is None and export.input_shape is None:
        export.example_input = _first_input(loader)
    plan = None
    if latency_budget is not None:
        chosen, plan = _latency_budget(
            source,
            chosen,
            latency_budget,
            _reiterable(loader, description),
            result.metric,
            latency=latency_fn,
            progress=progress,
            scored_on="data",
            device=device,
            output_key=output_key,
            ignore_index=ignore_index,
            segmentation=result.task == "segmentation",
            data_hint=description,
            selection=budget_selection,
        )
    outcome = _finish(source, chosen, out, export, warnings=warnings, data_pass=True, progress=progress)
    outcome.report["sweep"] = result
    _budget_outputs(outcome, plan, budget_plot)
    if plot is not None and _writes():
        outcome.report["plot"] = plot_sweep(result, plot)
    if report is not None and _writes():
        outcome.report["report"] = write_report(result, report)
    return outcome


@_with_progress
def tune(
    model: ModelLike,
    data: Any,
    train_batch_size: int,
    *,
    metric: str = "nll",
    holdout: float = 0.3,
    seed: int = 0,
    recalibrate: bool | None = None,
    upstream: str | None = None,
    ignore_index: int = 255,
    per_channel: bool = False,
    strengths: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    max_epochs: int | None = None,
    out: str | Path | None = None,
    report: str | Path | None = None,
    plot: str | Path | None = None,
    max_examples: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    data_spec: Any = None,
    forward_fn: Any = None,
    output_key: str | int | None = None,
    progress: Any = None,
    export: ExportOptions | None = None,
    latency_budget: float | None = None,
    budget_plot: str | Path | None = None,
    latency_fn: Any = None,
    **load_options: Any,
) -> Outcome:
    """The best safe correction, fitted to the metric, with a held-out check (:mod:`bncorrect.tune`).

    ``data`` (labelled, indexable: a path, arrays ``(x, y)`` or a map-style Dataset) is split, seeded (and
    stratified by label for class labels; per image for masks), into a fitting part and a held-out part
    (``holdout``). On the fitting part: EMA, the rule 1/B^2, the best global alpha (sweep), EvalNorm offline
    on the running statistics, EvalNorm offline after recalibration on the fitting part (``upstream``:
    ``"train"`` by default, or ``"eval"``; ``recalibrate=False`` leaves this candidate out) and per-layer
    alpha/beta fitted to the NLL (L1 ``strengths``, ``per_channel``). Every candidate is scored on the
    held-out part and the best by ``metric`` (nll, top1, top5; segmentation: pixel-nll, miou, pixel-acc over
    the pixels whose mask value is not ``ignore_index``, with ``output_key`` picking per-pixel logits) is
    written to ``out``, never one worse than EMA there; a recalibrated candidate's statistics replace the
    running statistics in what is written. ``outcome.report["tune"]`` is the
    :class:`~bncorrect.tune.TuneResult`; ``report`` (JSON) and ``plot`` (PNG) are written on request.
    PyTorch models only (an ONNX graph: tune its PyTorch original and ``apply`` the corrections).

    ``recalibrate=True`` was an opt-in before, which replaced the EvalNorm candidate by its recalibrated
    form with ``upstream="eval"``; it is the default now and adds the candidate beside the plain one, with
    ``upstream="train"`` unless ``upstream`` is given (a note in the result says so when it is passed).

    ``latency_budget`` R (OUT ``.onnx``): of the chosen correction, keep only the layers worth their
    latency: leave-one-out held-out gains, onnxruntime costs (held-out shapes), the exact additive Pareto
    frontier of subsets measured as real graphs, and the best measured one whose latency ratio stays <= R
    is written (:mod:`bncorrect.latency`; ``outcome.report["latency_budget"]``, ``budget_plot`` PNG;
    ``latency_fn`` replaces the latency measurement)."""
    from .tune import (
        DEFAULT_MAX_EPOCHS,
        DEFAULT_STRENGTHS,
        DEFAULT_UPSTREAM,
        dataset_labels,
        plot_tune,
        tune_model,
        write_tune_report,
    )

    _check_batch_size("train_batch_size", train_batch_size)
    legacy_note = None
    if recalibrate is True and upstream is None:
        legacy_note = (
            f"{spell('recalibrate')} is the default now: EvalNorm offline is scored both on the running "
            f"statistics and after recalibration ({spell('upstream', DEFAULT_UPSTREAM)}; before, "
            f"{spell('recalibrate')} replaced the EvalNorm candidate and meant "
            f"{spell('upstream', 'eval')}: pass it for those statistics)"
        )
    recalibrate = True if recalibrate is None else bool(recalibrate)
    upstream = DEFAULT_UPSTREAM if upstream is None else upstream
    if recalibrate:
        _check_upstream(upstream)
    _check_device(device)
    _check_files(model, data=data, out=out, plot=plot, report=report, budget_plot=budget_plot)
    _check_budget_options(latency_budget, budget_plot, out, metric, forward_fn=forward_fn)
    source = _require_torch(open_model(model, **load_options), "tune")
    if out is not None:
        _check_out(out, source)
    channels = correctable_channels(source)
    dataset = open_data(data, data_spec)
    description = getattr(dataset, "description", type(dataset).__name__)
    if latency_budget is not None and dataset_labels(dataset, description).dim() == 3:
        raise UsageError(
            f"{spell('latency_budget', 'R')} scores classification models only, and this data holds "
            "segmentation masks",
            path=getattr(dataset, "path", None),
            hint=f"leave {spell('latency_budget', 'R')} out for segmentation: tune then writes the whole "
            "chosen correction",
        )
    result = tune_model(
        source.model,
        dataset,
        train_batch_size,
        metric=metric,
        holdout=holdout,
        seed=seed,
        alphas=alphas,
        strengths=DEFAULT_STRENGTHS if strengths is None else strengths,
        per_channel=per_channel,
        recalibrate=recalibrate,
        upstream=upstream,
        ignore_index=ignore_index,
        max_examples=max_examples,
        max_epochs=DEFAULT_MAX_EPOCHS if max_epochs is None else max_epochs,
        device=device,
        num_workers=num_workers,
        forward_fn=forward_fn,
        output_key=output_key,
        progress=progress,
        data_hint=description,
    )
    if legacy_note is not None:
        result.notes.append(legacy_note)
    stats = result.running_stats() or {}
    layers = {
        name: LayerCorrection(a, b, *stats.get(name, (None, None)))
        for name, (a, b) in result.coefficients().items()
        if name in channels
    }
    chosen = result.chosen
    corrections = Corrections(
        layers,
        f"tune ({chosen.kind}: {chosen.label})",
        train_batch_size,
        source.sha256,
        description,
        {
            "metric": result.metric,
            "task": result.task,
            "chosen": chosen.as_dict(),
            "n_fit": result.n_fit,
            "n_heldout": result.n_heldout,
            "seed": seed,
            "holdout": result.holdout,
            "notes": list(result.notes),
        },
    )
    export = export or ExportOptions()
    if export.example_input is None and export.input_shape is None and len(dataset):
        export.example_input = torch.stack(
            [torch.as_tensor(dataset[i][0]) for i in range(min(2, len(dataset)))]
        )
    plan = None
    if latency_budget is not None:
        batches = _labelled_batches(dataset, result.heldout_indices, description)
        corrections, plan = _latency_budget(
            source,
            corrections,
            latency_budget,
            batches,
            metric,
            latency=latency_fn,
            progress=progress,
            device=device,
            output_key=output_key,
            data_hint=description,
        )
    outcome = _finish(source, corrections, out, export, data_pass=True, progress=progress)
    outcome.report["tune"] = result
    _budget_outputs(outcome, plan, budget_plot)
    if plot is not None and _writes():
        outcome.report["plot"] = plot_tune(result, plot)
    if report is not None and _writes():
        outcome.report["report"] = write_tune_report(result, report)
    return outcome

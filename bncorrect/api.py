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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .atomic import check_output
from .correction import rule_of_thumb
from .corrections import Corrections, LayerCorrection, load_corrections, save_corrections
from .errors import ModelLoadError, NoBatchNormError, UsageError
from .layers import correct_model, corrected_layers, find_norm_layers
from .models import LoadedModel, load_model, save_checkpoint

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".onnx")


@dataclass
class OnnxModel:
    """An ONNX graph loaded from ``path``."""

    proto: Any
    path: Path
    sha256: str


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


def open_model(model: ModelLike, **load_options: Any) -> Source:
    """Load MODEL (path or object) into a :class:`LoadedModel` or :class:`OnnxModel`."""
    if isinstance(model, LoadedModel | OnnxModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(model, Path("<in-memory>"), "pickled-module", "")
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        from .models import file_sha256
        from .onnx_graph import load_onnx

        if not path.is_file():
            raise ModelLoadError("model file not found", path=path, hint="check the path")
        return OnnxModel(load_onnx(path), path, file_sha256(path))
    return load_model(path, **load_options)


def layer_summaries(source: Source) -> list[dict[str, Any]]:
    """One dict per BN layer (name, type, channels, eps, momentum, correctable, reason, stats)."""
    if isinstance(source, OnnxModel):
        from .onnx_graph import find_bn_nodes

        return [_onnx_summary(ly) for ly in find_bn_nodes(source.proto)]
    return [ly.summary() for ly in find_norm_layers(source.model)]


def _onnx_summary(ly: Any) -> dict[str, Any]:
    return {
        "name": ly.name,
        "type": "BatchNormalization",
        "channels": ly.channels,
        "eps": ly.eps,
        "momentum": None,
        "affine": True,
        "correctable": ly.correctable,
        "reason": ly.reason,
        "torch_name": ly.torch_name,
    }


def correctable_channels(source: Source) -> dict[str, int]:
    """Name -> channels of every layer that can be corrected; NoBatchNormError when there is none."""
    layers = layer_summaries(source)
    out = {ly["name"]: int(ly["channels"]) for ly in layers if ly["correctable"]}
    if not out:
        path = source.path
        if layers:
            reasons = "; ".join(f"{ly['name']}: {ly['reason']}" for ly in layers[:5])
            raise NoBatchNormError(f"no BatchNorm layer can be corrected ({reasons})", path=path)
        if isinstance(source, OnnxModel):
            from .onnx_graph import no_bn_message

            raise NoBatchNormError(no_bn_message(source.proto), path=path)
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


def rule(
    model: ModelLike,
    train_batch_size: int,
    *,
    out: str | Path | None = None,
    export: ExportOptions | None = None,
    **load_options: Any,
) -> Outcome:
    """EvalNorm's rule of thumb: alpha = beta = 1/B^2 for every BN layer."""
    if train_batch_size < 1:
        raise UsageError(f"--train-batch-size must be >= 1, got {train_batch_size}")
    source = open_model(model, **load_options)
    a = rule_of_thumb(train_batch_size)
    corrections = Corrections.uniform(
        list(correctable_channels(source)),
        a,
        method="rule-of-thumb",
        train_batch_size=train_batch_size,
        model_sha256=_sha(source),
    )
    return _finish(source, corrections, out, export)


def weight(
    model: ModelLike,
    alpha: float,
    beta: float | None = None,
    *,
    out: str | Path | None = None,
    export: ExportOptions | None = None,
    **load_options: Any,
) -> Outcome:
    """Inference example weighing: one alpha (and beta, default = alpha) for every BN layer."""
    for label, v in (("--alpha", alpha), ("--beta", beta)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise UsageError(f"{label} must lie in [0, 1], got {v}")
    source = open_model(model, **load_options)
    corrections = Corrections.uniform(
        list(correctable_channels(source)), alpha, beta, method="example-weighing", model_sha256=_sha(source)
    )
    return _finish(source, corrections, out, export)


def apply(
    model: ModelLike,
    corrections: str | Path | Corrections,
    *,
    out: str | Path | None = None,
    export: ExportOptions | None = None,
    **load_options: Any,
) -> Outcome:
    """Apply a corrections file (or :class:`Corrections`) to MODEL."""
    corr_path = None if isinstance(corrections, Corrections) else Path(corrections)
    corr = load_corrections(corr_path) if corr_path is not None else corrections
    source = open_model(model, **load_options)
    if out is not None and corr_path is not None:
        check_output(out, corr_path)
    return _finish(source, corr, out, export, corrections_source=corr_path)


def apply_to_module(
    model: nn.Module, corrections: Corrections, *, source: str | Path | None = None
) -> nn.Module:
    """Validate ``corrections`` against ``model`` and correct it in place (running stats included)."""
    channels = {ly.name: ly.channels for ly in find_norm_layers(model) if ly.correctable}
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
) -> Outcome:
    """Correct the model in memory and, with ``out``, write the result by suffix."""
    if out is not None:
        out = _check_out(out, source)
    report: dict[str, Any] = {}
    if isinstance(source, OnnxModel):
        from .onnx_graph import match_layers, rewrite

        mapping = match_layers(source.proto, list(corrections.layers))
        report["matched"] = mapping
        node_corr = Corrections(
            {mapping[n]: lc for n, lc in corrections.layers.items()},
            corrections.method,
            corrections.train_batch_size,
            corrections.model_sha256,
            corrections.data,
            corrections.metrics,
        )
        channels = correctable_channels(source)
        node_corr.validate(channels, source=corrections_source)
        alpha, beta = node_corr.coefficients()
        stats = {
            n: (lc.running_mean, lc.running_var)
            for n, lc in node_corr.layers.items()
            if lc.running_mean is not None and lc.running_var is not None
        }
        corrected, rw = rewrite(source.proto, alpha, beta, running_stats=stats or None)
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
        outcome.output = write_output(outcome, out, export)
    return outcome


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
    return check_output(out, source.path if source.path.exists() else None)


def _write_onnx_source(outcome: Outcome, out: Path) -> Path:
    from .onnx_graph import save_onnx

    if out.suffix.lower() == ".safetensors":
        return save_corrections(outcome.corrections, out)
    return save_onnx(outcome.model, out)


def write_output(outcome: Outcome, out: str | Path, export: ExportOptions | None = None) -> Path:
    """Write a corrected PyTorch model by OUT's suffix (corrections file, checkpoint, or ONNX)."""
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
        }
        return save_checkpoint(outcome.model, out, source=source, meta=meta)
    export = export or ExportOptions()
    example = _example_input(export, source)
    from .onnx_graph import export_onnx

    report = export_onnx(
        outcome.model,
        example,
        out,
        opset=export.opset,
        dynamic_batch=export.dynamic_batch,
        verify=export.verify,
    )
    outcome.report["export"] = report
    return out


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
        raise UsageError(f"--input-shape {text!r} is not a list of positive integers, e.g. 1,3,224,224")
    return shape


def corrections_from_model(model: nn.Module, *, method: str, **meta: Any) -> Corrections:
    """Read the alpha/beta of every corrected layer back into a :class:`Corrections`."""
    layers = {
        n: LayerCorrection(m.alpha.detach().cpu().clone(), m.beta.detach().cpu().clone())
        for n, m in corrected_layers(model).items()
    }
    return Corrections(layers, method, **meta)

"""Export a (corrected) PyTorch model to ONNX, verify the graph against PyTorch, and ``--min-effect``.

One code path: the model is exported *without* its corrections (the :class:`~bncorrect.layers.CorrectedNorm`
wrappers are stripped on a deep copy) by ``torch.onnx.export(dynamo=True, optimize=False)``, which keeps the
BatchNormalization nodes and names their parameters after the PyTorch modules (``layer1.0.bn1.running_mean``).
Constants are then folded with onnxscript's folder (the exporter's default optimizer would also fold BN into
the Conv), and the BN nodes are rewritten by :func:`bncorrect.onnx_rewrite.rewrite` — the same rewrite used
for foreign graphs — matched by those parameter names. The written file is checked in onnxruntime against
the corrected PyTorch model before it is moved into place.

Needs ``onnxscript`` (the dynamo exporter's dependency) at export time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from . import correction as C
from .errors import OnnxError, VerificationError, shorten, spell
from .layers import as_batchnorm, corrected_layers, strip_corrections
from .onnx_rewrite import (
    RUNTIME_NOT_WRITTEN,
    RUNTIME_OK,
    GraphIndex,
    RewriteReport,
    find_bn_nodes,
    load_onnx,
    match_layers,
    rewrite,
    staged_save,
)

__all__ = [
    "ExportReport",
    "MinEffectReport",
    "export_onnx",
    "export_plain",
    "min_effect_filter",
    "run_onnx",
    "verify_onnx",
]


#: The progress description of an ONNX export (its steps: export, rewrite, verification).
EXPORT_STEPS = "ONNX export, rewrite, verification"


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how closely it matches PyTorch."""

    path: Path
    opset: int
    max_abs_diff: float | None
    rel_diff: float | None
    rewritten: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    rewrite: RewriteReport | None = None
    min_effect: MinEffectReport | None = None
    #: whether onnxruntime loads the written graph: "onnxruntime loads it" (proven by the verification run,
    #: or by a session created on the staged file with ``verify=False``) or "not checked: <why>".
    runtime_check: str = RUNTIME_NOT_WRITTEN
    #: warnings about how the graph was made (the TorchScript exporter stood in for torch.export)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """JSON-friendly report."""
        return {
            "path": str(self.path),
            "opset": self.opset,
            "max_abs_diff": self.max_abs_diff,
            "rel_diff": self.rel_diff,
            "rewritten": list(self.rewritten),
            "kept": list(self.kept),
            "min_effect": None if self.min_effect is None else self.min_effect.summary(),
            "runtime_check": self.runtime_check,
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------ a silent exporter

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
#: loggers whose records are captured during export (with every child logger that has handlers of its own:
#: torch._logging gives torch.onnx, torch.export, torch._dynamo, ... stderr handlers that do not propagate).
_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI colour/cursor escape sequences (torch's error messages carry some)."""
    return _ANSI.sub("", text)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.sink.append(self.format(record))


class _Captured:
    """What the exporter printed, logged and warned while :func:`_capture` was active."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.records: list[str] = []
        self.warnings: list[str] = []
        self.fd_text = ""

    def text(self) -> str:
        parts = [self.stream.getvalue(), self.fd_text, "\n".join(self.records), "\n".join(self.warnings)]
        return strip_ansi("\n".join(p.strip("\n") for p in parts if p.strip()))


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _capture() -> Iterator[_Captured]:
    """Swallow everything torch.onnx.export and its helpers emit: Python-level stdout/stderr, the log
    records of torch/onnxscript/onnx_ir loggers (their own handlers too, which hold the original stderr),
    warnings, and the OS-level file descriptors 1 and 2 (torch's C++ side writes there directly). The
    caller decides whether to show it (the error's ``detail``) or not (success)."""
    cap = _Captured()
    with tempfile.TemporaryFile(mode="w+b") as sink, _loggers_to(cap.records), _fds_to(sink):
        try:
            with (
                warnings.catch_warnings(record=True) as caught,
                contextlib.redirect_stdout(cap.stream),
                contextlib.redirect_stderr(cap.stream),
            ):
                warnings.simplefilter("always")
                try:
                    yield cap
                finally:
                    cap.warnings = [
                        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    ]
        finally:
            _flush_c_stdio()
            with contextlib.suppress(Exception):
                sink.flush()
                sink.seek(0)
                cap.fd_text = sink.read().decode("utf-8", "replace")


@contextlib.contextmanager
def _loggers_to(sink: list[str]) -> Iterator[None]:
    """Route the records of the :data:`_LOGGERS` (and of every child of theirs that has handlers) to
    ``sink`` instead of their handlers; restored on exit."""
    handler = _ListHandler(sink)
    names = [
        n
        for n, lg in list(logging.Logger.manager.loggerDict.items())
        if isinstance(lg, logging.Logger) and any(n == p or n.startswith(p + ".") for p in _LOGGERS)
    ]
    saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    try:
        for n in dict.fromkeys([*_LOGGERS, *names]):
            lg = logging.getLogger(n)
            if n in _LOGGERS or lg.handlers:
                saved.append((lg, list(lg.handlers), lg.propagate))
                lg.handlers = [handler]
                lg.propagate = False
        yield
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate


@contextlib.contextmanager
def _fds_to(sink: Any) -> Iterator[None]:
    """Point file descriptors 1 and 2 at ``sink`` (a real file) for the duration; restored on exit."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    _flush_c_stdio()
    saved: list[tuple[int, int]] = []
    try:
        for fd in (1, 2):
            try:
                dup = os.dup(fd)
            except OSError:  # no such descriptor (a daemon with closed stdio): nothing to capture there
                continue
            saved.append((fd, dup))
            os.dup2(sink.fileno(), fd)
        yield
    finally:
        _flush_c_stdio()
        for fd, dup in reversed(saved):
            with contextlib.suppress(OSError):
                os.dup2(dup, fd)
            with contextlib.suppress(OSError):
                os.close(dup)


def _root_cause(e: BaseException) -> BaseException:
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def _first_line(e: BaseException) -> str:
    text = strip_ansi(str(e)).strip()
    return text.splitlines()[0].strip() if text else ""


_USER_FRAME = re.compile(
    r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n([^\n]*)'
)


def _export_cause(e: BaseException) -> str:
    """One line on why torch.onnx.export failed: the innermost exception (torch wraps the real one in a
    page of advice) and, when torch.export names it, the line of the model's code."""
    root = _root_cause(e)
    cause = f"{type(root).__name__}: {_first_line(root)}" if _first_line(root) else type(root).__name__
    m = _USER_FRAME.search(strip_ansi(str(e)))
    if m:
        cause += f" (at {Path(m.group(1)).name}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()[:80]})"
    return shorten(cause, 300)


def _export_detail(e: BaseException, log: str) -> str:
    import traceback

    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return strip_ansi((log.strip() + "\n\n" if log.strip() else "") + tb).strip()


def _export_hint() -> str:
    """The hint when neither of torch.onnx's exporters can write the model."""
    return (
        "neither of torch.onnx's exporters could write the model (torch.export, then the TorchScript "
        "tracer): change the part of the model the message names, or write .safetensors or .pt instead; a "
        "graph exported by other means with BatchNorm kept is corrected by `bncorrect apply model.onnx "
        f"CORRECTIONS -o OUT.onnx`. {_log_where()} (both exporters')"
    )


def _log_where() -> str:
    if spell("debug").startswith("--"):
        return "--debug shows the exporter's log"
    return "The exporter's log is in the error's .detail"


def _shape_text(args: Sequence[Any]) -> str:
    shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
    if len(shapes) == 1:
        return f"an input of shape {shapes[0]}"
    return "inputs of shapes " + ", ".join(str(s) for s in shapes)


def _suggested_shape(model: nn.Module, args: Sequence[Any]) -> tuple[int, ...] | None:
    """An input shape the model's first Conv/Linear takes, derived from ``args[0]``'s shape."""
    if len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    shape = tuple(int(d) for d in args[0].shape)
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)), None)
    if isinstance(first, nn.modules.conv._ConvNd) and not isinstance(first.weight, nn.UninitializedParameter):
        k = len(first.kernel_size)
        spatial = shape[2:] if len(shape) == k + 2 else (8,) * k
        want = (shape[0] if shape else 1, int(first.in_channels), *spatial)
    elif isinstance(first, nn.Linear) and first.in_features > 0 and len(shape) >= 2:
        want = (*shape[:-1], int(first.in_features))
    else:
        return None
    return want if want != shape else None


def _check_runs(model: nn.Module, args: tuple[Any, ...]) -> Any:
    """Run ``model`` once on the example input, so that a wrong input shape gets a message about the
    shape, not a page of torch.export internals; returns the output."""
    was_training = model.training
    try:
        model.eval()  # a check only: no running statistics may change
        with torch.no_grad(), _capture():
            return model(*args)
    except Exception as e:
        want = _suggested_shape(model, args)
        if spell("input_shape").startswith("--"):  # the command line
            option = "--input-shape"
            example = "" if want is None else f", e.g. --input-shape {','.join(map(str, want))}"
        else:
            option = "an example input (ExportOptions.input_shape or example_input)"
            example = "" if want is None else f", e.g. {want}"
        why = shorten(_first_line(e) or type(e).__name__, 240)
        raise OnnxError(
            f"the model cannot run on {_shape_text(args)}: {why}",
            hint=f"pass {option} with the shape the model takes{example}",
            detail=_export_detail(e, ""),
        ) from None
    finally:
        model.train(was_training)


def _output_names(output: Any) -> list[str] | None:
    """Graph output names after the model's own: the keys of a dict of tensors (torchvision segmentation:
    ``out``, ``aux``, so ``--output-key out`` works on the graph too); None (the exporter's names) for
    anything else."""
    if isinstance(output, Mapping) and output and all(isinstance(v, Tensor) for v in output.values()):
        names = [str(k) for k in output]
        if all(n.isidentifier() for n in names) and len(set(names)) == len(names):
            return names
    return None


def export_plain(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    notes: list[str] | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (as it is, in eval mode) with its BatchNormalization nodes kept, constants folded.

    When torch.export cannot capture the model, the TorchScript exporter (opset ``opset`` or
    :data:`LEGACY_OPSET`) writes it, and a warning saying so (and what the tracer fixed) goes to
    ``notes``; when both fail, the :class:`OnnxError` is torch.export's."""
    try:
        import onnx_ir.passes.common as ir_passes
        import onnxscript.optimizer as script_optimizer
        from onnx_ir import serde
    except ImportError as e:
        raise OnnxError(
            f"ONNX export needs onnxscript ({e})",
            hint="pip install onnxscript (torch.onnx's dynamo exporter uses it)",
        ) from None
    args = tuple(example_input) if isinstance(example_input, list | tuple) else (example_input,)
    output_names = _output_names(_check_runs(model, args))
    dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
    cap: _Captured | None = None
    try:
        with _capture() as cap:
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                optimize=False,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                output_names=output_names,
                verbose=False,
            )
            ir_model = program.model
            script_optimizer.fold_constants(ir_model)
            ir_passes.RemoveUnusedNodesPass()(ir_model)
            proto = serde.serialize_model(ir_model)
    except OnnxError:
        raise
    except Exception as e:
        detail = _export_detail(e, cap.text() if cap is not None else "")
        # torch.export could not capture the model (data-dependent control flow, list outputs of
        # detection models): the TorchScript tracer often can, for the example input's path through it
        try:
            proto, tracer_warnings = _trace_export(
                model, args, opset or LEGACY_OPSET, dynamic_batch, output_names
            )
        except OnnxError as legacy:
            raise OnnxError(
                f"torch.onnx.export failed: {_export_cause(e)}",
                hint=_export_hint(),
                detail=f"{detail}\n\nthe TorchScript exporter failed too: {legacy.message}\n"
                f"{legacy.detail or ''}",
            ) from None
        fixed = None
        if dynamic_batch and not _takes_other_batches(proto, model, args):
            # a trace may bake the batch size in (torchvision's detection models split the batch into a
            # list of images): write the graph for the example's batch size, and say so
            proto, tracer_warnings = _trace_export(model, args, opset or LEGACY_OPSET, False, output_names)
            fixed = int(args[0].shape[0])
        if notes is not None:
            notes.append(_traced_note(_export_cause(e), tracer_warnings, fixed))
        return proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and got != opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception:  # the dynamo exporter's graphs start at opset 18; older opsets: legacy exporter
            proto = _export_legacy(model, args, opset, dynamic_batch)
    return proto


def _export_legacy(
    model: nn.Module, args: tuple[Tensor, ...], opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    """TorchScript-based exporter for opsets the dynamo exporter cannot write; BN kept with
    ``training=TrainingMode.PRESERVE`` (the model is in eval mode, so BN exports in inference form)."""
    try:
        return _trace_export(model, args, opset, dynamic_batch, None)[0]
    except OnnxError as e:
        raise OnnxError(
            f"exporting to opset {opset} (legacy TorchScript exporter) failed: {e.message}",
            hint=f"use {spell('opset', 18)} or newer, or leave it out (the dynamo exporter writes opset 18+)",
            detail=e.detail,
        ) from None


#: The opset of the TorchScript exporter's graphs when the dynamo exporter cannot capture the model and no
#: opset is asked for (the newest it writes without warnings in torch 2.13).
LEGACY_OPSET = 17


def _trace_export(
    model: nn.Module,
    args: tuple[Tensor, ...],
    opset: int,
    dynamic_batch: bool,
    output_names: list[str] | None,
) -> tuple[onnx.ModelProto, list[str]]:
    """The TorchScript exporter (``dynamo=False``) with BN kept, and the tracer's warnings (Python control
    flow or values the trace fixed to the example input's)."""
    names = [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    buf = io.BytesIO()
    cap: _Captured | None = None
    try:
        with _capture() as cap:
            torch.onnx.export(
                model,
                args,
                buf,
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE,
                input_names=names,
                output_names=output_names,
                dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None,
            )
    except Exception as e:
        raise OnnxError(
            f"the TorchScript exporter failed: {_export_cause(e)}",
            detail=_export_detail(e, cap.text() if cap is not None else ""),
        ) from None
    assert cap is not None
    tracer = [w for w in cap.warnings if w.startswith("TracerWarning")]
    return onnx.load_from_string(buf.getvalue()), tracer


def _takes_other_batches(proto: onnx.ModelProto, model: nn.Module, args: tuple[Tensor, ...]) -> bool:
    """Whether a graph exported with a dynamic batch dimension reproduces ``model`` on a batch one larger
    than the example's (the example with its first row repeated)."""
    if not args or not all(isinstance(a, Tensor) and a.dim() > 0 for a in args):
        return False
    bigger = tuple(torch.cat([a, a[:1]]) for a in args)
    try:  # quiet: onnxruntime would log its refusal as an error, while it only means "no"
        return _compare(proto, model, bigger, quiet=True)[1] <= 1e-4
    except Exception:  # onnxruntime refusing the batch size, or outputs of other shapes
        return False


def _traced_note(cause: str, tracer_warnings: list[str], fixed_batch: int | None = None) -> str:
    """The warning for a graph written by the TorchScript exporter after torch.export failed."""
    note = (
        f"torch.export could not capture the model ({shorten(cause, 160)}), so the graph was written by "
        "torch.onnx's TorchScript exporter (a trace of the example input) and verified on that input"
    )
    if fixed_batch is not None:
        note += (
            f"; the trace does not run other batch sizes, so the graph takes batches of exactly "
            f"{fixed_batch}, the example's (another with --input-shape on the command line, "
            "ExportOptions(input_shape=...) in Python)"
        )
    if tracer_warnings:
        first = tracer_warnings[0].split(" (", 1)[0].removeprefix("TracerWarning: ")
        note += (
            f"; the tracer fixed {len(tracer_warnings)} Python value(s) or branch(es) to the example's "
            f"(first: {shorten(first, 160)}), so check the graph on inputs of other shapes and contents"
        )
    return note


def export_onnx(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    external_data: bool | None = None,
    min_effect: float | None = None,
    probe: Tensor | Sequence[Tensor] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> ExportReport:
    """Export ``model`` (which may contain CorrectedNorm wrappers) to ``path`` with its normalization
    rewritten as corrected-BN subgraphs, and (``verify``) check it against the corrected PyTorch model.

    The model is exported in eval mode on deep copies; the caller's model is not changed. Verification runs
    the written graph in onnxruntime and the corrected model on ``example_input``; it raises
    :class:`VerificationError` when max|onnx - torch| / max|torch| exceeds ``rtol``, and then ``path`` is not
    written.

    ``min_effect``: layers whose correction changes their output by less than this (relative to the
    output's RMS, :func:`min_effect_filter`) on ``probe`` (default ``example_input``; give real data) stay
    plain BatchNormalization nodes, which runtimes fold into the preceding Conv; the verification then
    compares against the PyTorch model with those layers plain too.

    ``progress(EXPORT_STEPS, k, 3)`` is called before the export (k = 0), after it (1), after the rewrite (2)
    and after the verification (3): torch.onnx can take tens of seconds on a large model.
    """
    step = progress or (lambda *_: None)
    step(EXPORT_STEPS, 0, 3)
    path = Path(path)
    reference = copy.deepcopy(model).cpu().eval()
    # BN-like layers that are not _BatchNorm (FrozenBatchNorm2d) become equivalent BatchNorm modules, so the
    # exporter writes BatchNormalization nodes named after them, which the rewrite then corrects
    plain = as_batchnorm(strip_corrections(copy.deepcopy(reference))).eval()
    example_input = _to_cpu(example_input)
    coefs = {
        name: (m.alpha.detach().cpu(), m.beta.detach().cpu())
        for name, m in corrected_layers(reference).items()
        if not m.is_identity()
    }
    notes: list[str] = []
    proto = export_plain(plain, example_input, opset=opset, dynamic_batch=dynamic_batch, notes=notes)
    step(EXPORT_STEPS, 1, 3)
    alpha: dict[str, Tensor] = {}
    beta: dict[str, Tensor] = {}
    if coefs:
        try:
            mapping = match_layers(proto, list(coefs))
        except OnnxError as e:
            raise OnnxError(
                "the exported graph's BatchNormalization nodes do not match the corrected layers: "
                f"{e.message}",
                hint="a corrected layer whose forward does not go through batch_norm (custom code computing "
                "the normalization itself) exports as other ops and cannot be corrected in ONNX; write "
                ".safetensors or .pt instead, or correct only the layers that export as BatchNormalization",
            ) from None
        for torch_name, node_name in mapping.items():
            alpha[node_name], beta[node_name] = coefs[torch_name]
    effect = None
    if min_effect is not None and alpha:
        data = _to_cpu(probe if probe is not None else example_input)
        effect = min_effect_filter(proto, alpha, beta, data, min_effect)
        alpha, beta = effect.filter(alpha), effect.filter(beta)
        node_names = {node: name for name, node in mapping.items()}
        layers = corrected_layers(reference)
        for node in effect.kept:  # the reference keeps these layers plain as well
            layers[node_names[node]].alpha.zero_()
            layers[node_names[node]].beta.zero_()
    corrected, report = rewrite(proto, alpha, beta)
    step(EXPORT_STEPS, 2, 3)
    if report.skipped:
        raise OnnxError(
            "some corrected layers cannot be rewritten in the exported graph: "
            + "; ".join(f"{n}: {r}" for n, r in report.skipped),
            hint="this is unexpected for a fresh export; please report it",
        )
    node_to_torch = {ly.name: ly.torch_name or ly.name for ly in find_bn_nodes(proto)}
    got_opset = next(o.version for o in corrected.opset_import if o.domain in ("", "ai.onnx"))
    max_abs = rel = None
    # With verify, the verification run itself proves onnxruntime loads (and runs) the staged file: one
    # session either way.
    with staged_save(
        corrected, path, external_data=external_data, check_runtime=not verify, report=report
    ) as tmp:
        if verify:
            max_abs, rel = _verify_staged(tmp, path, reference, example_input)
            report.runtime_check = RUNTIME_OK
            if not rel <= rtol:
                raise VerificationError(
                    "the exported graph differs from the corrected PyTorch model: "
                    f"max |diff| = {max_abs:.3g}, "
                    f"{rel:.3g} relative to the output scale (limit {rtol:g})",
                    path=path,
                    hint="nothing was written; re-run with --no-verify to keep the graph anyway, and please "
                    "report "
                    "the model",
                )
    step(EXPORT_STEPS, 3, 3)
    return ExportReport(
        path=path,
        opset=int(got_opset),
        max_abs_diff=max_abs,
        rel_diff=rel,
        rewritten=[node_to_torch.get(n, n) for n in report.rewritten],
        kept=[node_to_torch.get(n, n) for n in report.kept],
        rewrite=report,
        min_effect=effect,
        runtime_check=report.runtime_check,
        notes=notes,
    )


def _verify_staged(
    tmp: Path, path: Path, reference: nn.Module, example_input: Tensor | Sequence[Tensor]
) -> tuple[float, float]:
    """:func:`_compare` on the staged file, its errors naming the output ``path`` (the staged file is
    removed) and saying that nothing was written."""
    try:
        return _compare(tmp, reference, example_input)
    except VerificationError as e:
        raise VerificationError(
            f"{e.message}; nothing was written", path=path, hint=e.hint, detail=e.detail
        ) from None
    except OnnxError as e:
        raise OnnxError(
            f"{e.message.replace(str(tmp), str(path))}; nothing was written",
            path=path,
            hint="if torch.onnx.export wrote a graph that onnxruntime refuses, please report it with the "
            "message above; re-running with a different opset may avoid it",
            detail=e.detail,
        ) from None


def _to_cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, list | tuple):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, Tensor):
        return [out.detach().cpu().float().numpy() if out.is_floating_point() else out.detach().cpu().numpy()]
    if isinstance(out, Mapping):
        return [a for v in out.values() for a in _flatten(v)]
    if isinstance(out, list | tuple):
        return [a for v in out for a in _flatten(v)]
    return []


def run_onnx(
    model: str | Path | onnx.ModelProto,
    inputs: Tensor | np.ndarray | Sequence[Any] | Mapping[str, Any],
    *,
    outputs: list[str] | None = None,
    threads: int | None = None,
    quiet: bool = False,
) -> list[np.ndarray]:
    """Run a graph in onnxruntime (CPU) on ``inputs`` (one array, a sequence in graph-input order, or a
    mapping by input name). ``quiet``: onnxruntime logs nothing, not even its errors (for probes whose
    failure is an answer, not a problem to report)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4 if quiet else 3
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxError(
            f"onnxruntime cannot load the graph ({str(e).strip().splitlines()[0]})",
            path=None if isinstance(model, onnx.ModelProto) else model,
        ) from None
    names = [i.name for i in sess.get_inputs()]
    types = {i.name: i.type for i in sess.get_inputs()}

    def arr(v: Any, name: str) -> np.ndarray:
        a = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        want = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}.get(
            types[name]
        )
        return a.astype(want) if want is not None and a.dtype != want else a

    if isinstance(inputs, Mapping):
        feed = {k: arr(v, k) for k, v in inputs.items()}
    elif isinstance(inputs, list | tuple):
        feed = {n: arr(v, n) for n, v in zip(names, inputs, strict=False)}
    else:
        feed = {names[0]: arr(inputs, names[0])}
    try:
        return list(sess.run(outputs, feed))
    except Exception as e:
        raise OnnxError(
            f"onnxruntime failed to run the graph ({str(e).strip().splitlines()[0]})",
            path=None if isinstance(model, onnx.ModelProto) else model,
            hint="check the input shape and type against the graph's inputs",
        ) from None


def _compare(
    graph: str | Path | onnx.ModelProto,
    torch_model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    *,
    quiet: bool = False,
) -> tuple[float, float]:
    args = tuple(example_input) if isinstance(example_input, list | tuple) else (example_input,)
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            ref = _flatten(torch_model(*args))
    finally:
        torch_model.train(was_training)
    got = run_onnx(graph, list(args), quiet=quiet)
    if len(got) != len(ref):
        raise VerificationError(f"the graph has {len(got)} outputs, the PyTorch model {len(ref)}")
    max_abs = 0.0
    scale = 0.0
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            raise VerificationError(f"output shape {g.shape} differs from PyTorch's {r.shape}")
        if not r.size:
            continue
        max_abs = max(max_abs, float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))))
        scale = max(scale, float(np.max(np.abs(r))))
    return max_abs, max_abs / max(scale, 1e-12)


def verify_onnx(
    path_or_model: str | Path | onnx.ModelProto,
    torch_model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    rtol: float = 1e-4,
) -> float:
    """Run the graph in onnxruntime and ``torch_model`` (eval mode) on ``example_input``; return the max
    absolute difference, raising :class:`VerificationError` when it exceeds ``rtol`` times max|torch|."""
    source = None if isinstance(path_or_model, onnx.ModelProto) else path_or_model
    graph = path_or_model if source is None else load_onnx(source)
    max_abs, rel = _compare(graph, torch_model, example_input)
    if not rel <= rtol:
        raise VerificationError(
            f"the graph differs from the PyTorch model: max |diff| = {max_abs:.3g}, {rel:.3g} relative to "
            "the "
            f"output scale (limit {rtol:g})",
            path=source,
            hint="make sure the graph was exported from this model with these corrections",
        )
    return max_abs


# ------------------------------------------------------------------------------------------- min effect


@dataclass
class MinEffectReport:
    """Per-layer effect of the correction on the data: ``effects[name]`` is max|corrected - plain| of the
    layer's output divided by the RMS of its plain output (the layer's input taken from the uncorrected
    graph); layers below ``tol`` are ``kept`` plain (foldable), the others ``corrected``."""

    tol: float
    effects: dict[str, float]
    max_abs: dict[str, float]
    kept: list[str]
    corrected: list[str]

    def filter(self, coefs: Mapping[str, Any]) -> dict[str, Any]:
        """``coefs`` without the layers that stay plain (pass the result to :func:`rewrite`)."""
        return {k: v for k, v in coefs.items() if k in self.corrected}

    def summary(self) -> dict[str, object]:
        """JSON-friendly report."""
        return {
            "tol": self.tol,
            "effects": dict(self.effects),
            "max_abs": dict(self.max_abs),
            "kept": list(self.kept),
            "corrected": list(self.corrected),
        }


def min_effect_filter(
    model: onnx.ModelProto,
    alpha: Mapping[str, Any],
    beta: Mapping[str, Any],
    data: Tensor | np.ndarray | Sequence[Any] | Mapping[str, Any],
    tol: float,
    *,
    running_stats: Mapping[str, tuple[Any, Any]] | None = None,
) -> MinEffectReport:
    """Which layers' correction changes their output by less than ``tol`` (relative, see
    :class:`MinEffectReport`) on ``data`` — a batch for the graph's inputs. Keys are BN node names, as in
    :func:`bncorrect.onnx_rewrite.rewrite`; layers with new ``running_stats`` are always corrected."""
    layers = {ly.name: ly for ly in find_bn_nodes(model)}
    names = [n for n in dict.fromkeys([*alpha, *beta]) if n in layers and layers[n].correctable]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    taps = []
    for n in names:
        x = model.graph.node[layers[n].node_index].input[0]
        if x not in {o.name for o in probe.graph.output}:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(x))
            # an empty ValueInfo leaves the type to onnxruntime
        taps.append(x)
    values = run_onnx(probe, data, outputs=taps) if taps else []
    index = GraphIndex(model)  # parameter values, resolved the way the rewrite resolves them
    effects: dict[str, float] = {}
    max_abs: dict[str, float] = {}
    for n, xv in zip(names, values, strict=True):
        node = model.graph.node[layers[n].node_index]
        p = {
            k: torch.tensor(np.array(index.resolve(i, k)[0], dtype=np.float32))
            for k, i in zip(("scale", "bias", "mean", "var"), node.input[1:5], strict=True)
        }
        x = torch.from_numpy(np.asarray(xv, dtype=np.float32))
        a = alpha.get(n, 0.0)
        b = beta.get(n, a)
        a_t = torch.as_tensor(np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float32))
        b_t = torch.as_tensor(np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float32))
        eps = layers[n].eps
        plain = C.normalize(x, p["mean"], p["var"], eps, p["scale"], p["bias"])
        corr = C.corrected_batch_norm(x, p["mean"], p["var"], p["scale"], p["bias"], eps, a_t, b_t)
        diff = float((corr - plain).abs().max()) if x.numel() else 0.0
        rms = float(plain.pow(2).mean().sqrt()) if x.numel() else 1.0
        max_abs[n] = diff
        effects[n] = diff / max(rms, 1e-12)
    forced = set(running_stats or {})
    kept = [n for n in names if effects[n] < tol and n not in forced]
    corrected = [n for n in names if n not in kept]
    return MinEffectReport(tol=tol, effects=effects, max_abs=max_abs, kept=kept, corrected=corrected)

r"""Rewrite ``BatchNormalization`` nodes of an ONNX graph into the corrected layer of DESIGN §2.

Every BN node that gets a non-zero correction is replaced, in place, by a small subgraph with that layer's
alpha/beta and running statistics baked in as initializers. Its output keeps the BN's output name, so the
rest of the graph, the graph inputs/outputs and every other node stay byte-for-byte what they were.
Layers with alpha = beta = 0 keep their original node (runtimes still fold it into the preceding Conv);
with new running statistics only (``recalibrate``) the node stays a plain BN fed with the new statistics.

The subgraph (input ``x`` of shape (N, C, *spatial), statistics computed in float32 — fp16/bf16 inputs are
cast up and the result cast back — or float64 for double graphs; ``~`` marks a per-channel (C,) term
repeated N times, a constant when N is static (the graph's value_info or one shape inference), else
``Tile(., N)`` with N read once per symbolic batch dimension and shared)::

    statistics per (example, channel), (N, C, 1, ...):
      symbolic N, opset >= 17:  _, mu_i, r_i = LayerNormalization(x, ones(spatial), axis=2, epsilon=0)
                                beta * var_i = beta / (r_i * r_i)       both moments from one read, exact
      otherwise:                mu_i = ReduceMean(x);  xc = x - mu_i;  var_i = ReduceMean(xc * xc)
                                                                        exact two-pass
    d       = mu_i - mu_E
    var_hat = Sum(beta * var_i,  beta (1 - beta) * d^2,  (1 - beta) * var_E)      (+ eps inside the BN)
    affine step, one BatchNormalization over a (1, N*C, *spatial) view (the Reshapes are free):
      LayerNormalization statistics:  y = BN(view(x),  gamma~, b~, mean = mu_hat, var = var_hat, eps)
                                      mu_hat = alpha * mu_i + (1 - alpha) * mu_E
      two-pass statistics:            y = BN(view(xc), gamma~, b~, mean = (alpha - 1) d, var = var_hat, eps)
                                      (x - mu_hat = xc - (alpha - 1) d: xc exists already; no mu_hat)
      = gamma * (x - mu_hat) / sqrt(var_hat + eps) + b  =  x * s + t     one read + one write

    static batch size N (any opset): the two-pass layer runs on the (1, N*C, *spatial) view throughout —
      mu_i = ReduceMean(view(x)) (1, N*C, 1, ...), var_i = ReduceMean(xc * xc, axes 0, 2, ...) (N*C,)
      directly, every per-channel term a tiled (N*C,) constant (a scalar when alpha/beta are one value):
      no Shape, Slice or Tile and no reshape of the statistics (14 nodes per layer, 16-18 before).

The affine step is the per-(N, C) ``y = x * s + t`` of DESIGN §2 through BatchNormalization's kernel,
which also does the ``+ eps``, the rsqrt and the scaling, so the small-tensor math is a handful of ops on
(N, C) tensors. With beta = 0 no variance is computed (one ReduceMean, affine on x with mu_hat); with
alpha = 0 the LayerNormalization path's mean input is mu_E~, with alpha = 1 the two-pass one is zeros.
Coefficients that are one value are scalar constants. For (N, C) inputs (mu_i = x, var_i = 0) the layer is
elementwise: ``y = gamma (1 - alpha) d / sqrt((1 - beta) var_E + eps + beta (1 - beta) d^2) + b``,
``d = x - mu_E``; when the rank is unknown, x is viewed as (N, C, -1), which covers (N, C) too.

Why this formulation (``benchmarks/bench_onnx_inference.py``; numbers in benchmarks/README.md, "ONNX
Runtime inference cost"): in onnxruntime (CPU) the cost of a corrected layer is the number of full-size
elementwise passes, not the node count: every Sub/Mul/BatchNormalization over the activation costs one
(at batch 1 with 2 threads each also pays a thread-pool dispatch), a ReduceMean over the trailing axes
about a quarter of one. The exact two-pass statistics need Sub and Mul (ReduceSumSquare(xc) instead of
Mul + ReduceMean measured 1.3x slower: onnxruntime's generic reduction path); the affine step is one BN
pass (Mul + Add over the activation: two). So the two-pass layer is three passes (Sub, Mul, BN), the floor
(affine step only) one.

LayerNormalization (one op, writing a normalized output nobody reads) against the two-pass statistics at
opset >= 17, relative to the floor over 12 measured cases: with a symbolic N LayerNormalization ahead by
3-9% in 4 of 6, level in 1, behind by 8% in 1; with a static N the flat two-pass path ahead by 1-10% in 4
of 6, level in 1, behind by 6% in 1. Hence LayerNormalization for a symbolic N, the flat two-pass path for
a static one. Upgrading an opset-11 graph to opset 17 (onnx's version converter) measured no faster than
rewriting it at opset 11 (1.15-1.24 vs 1.13-1.32 of the floor, within noise), so no ``--upgrade-opset`` is
offered. Against the previous formulation (BN over the view of x with mu_hat, per-channel coefficient
arrays, Tile at run time even for a static N) the chosen one measured 0.88-1.01x at batch 32 and
0.69-1.00x at batch 1.

The one-pass variance E[x^2] - E[x]^2 (ReduceMean + ReduceSumSquare, no write) would be cheaper again but
is not exact enough: in float32 it is off by 2e-4 of the variance when |mean| = 10 std, 2e-3 at 30 std and
entirely wrong at 1000 std, where LayerNormalization's and the two-pass statistics stay within 4e-7
(``bench_onnx_inference.py --numerics``).

Graph surgery uses raw ``onnx`` protobuf and ``onnx.helper`` throughout: the rewrite is local (one node
becomes a short run of nodes at the same position), and protobuf in, protobuf out keeps every untouched
node, initializer and metadata entry byte-identical, which an IR round trip does not promise. Each
rewrite is pattern -> check (a reason or None) -> build; skipped nodes and their reasons are reported and
the result passes ``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import NoBatchNormError, OnnxError, shorten
from .health import statistics_problem

__all__ = [
    "FOLDED_BN_HINT",
    "RUNTIME_NOT_WRITTEN",
    "RUNTIME_OK",
    "Builder",
    "GraphIndex",
    "LayerPlan",
    "OnnxNormLayer",
    "RewriteReport",
    "cast_in",
    "check_loadable",
    "checker_error",
    "example_stats_nodes",
    "find_bn_nodes",
    "finish_layer",
    "load_onnx",
    "match_layers",
    "require_bn_nodes",
    "rewrite",
    "rewrite_with",
    "runtime_check",
    "save_onnx",
    "staged_save",
    "tensor_problem",
]

#: doc_string prefix of every node this module creates (so a rewritten graph is recognised as such).
MARK = "bncorrect:"
#: model metadata key listing what was rewritten.
META_KEY = "bncorrect"
MIN_OPSET = 9
#: above this size a model is saved with external data (protobuf cannot serialize 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

FOLDED_BN_HINT = (
    "BatchNorm was folded into the preceding Conv/Gemm when the model was exported, so the running "
    "statistics bncorrect needs are gone. Re-export with BN kept: torch.onnx.export(model, args, path, "
    "dynamo=True, optimize=False) or the legacy exporter with training=torch.onnx.TrainingMode.PRESERVE "
    "or do_constant_folding=False; or let bncorrect export the PyTorch model (`bncorrect apply MODEL.pt "
    "CORRECTIONS -o OUT.onnx`)"
)

_BN = "BatchNormalization"
_PARAMS = ("scale", "bias", "mean", "var")
_TORCH_SUFFIX = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

Coefficient = Any  # float | torch.Tensor | np.ndarray (kept loose: torch is not imported here)


# --------------------------------------------------------------------------------------------- file I/O


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX model, external data included; :class:`OnnxError` naming the file on anything else,
    including graphs onnxruntime could not load (:func:`check_loadable`), before any pass sees them."""
    path = Path(path)
    if not path.is_file():
        raise OnnxError("file not found", path=path, hint="check the path")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as e:
        raise OnnxError(
            f"external data file missing ({e.filename or e})",
            path=path,
            hint="keep the model's external data file(s) next to it, under the names it was saved with",
        ) from None
    except Exception as e:  # protobuf DecodeError, ValidationError, OSError: all mean "not a model"
        if "should be stored in" in str(e) or "external" in str(e).lower():
            raise OnnxError(
                f"external data missing or unreadable ({e})",
                path=path,
                hint="keep the model's external data file(s) next to it, under the names it was saved with",
            ) from None
        raise OnnxError(
            f"not a readable ONNX model ({type(e).__name__}: {e})",
            path=path,
            hint="pass a .onnx file written by an ONNX exporter",
        ) from None
    if not model.HasField("graph") or not model.opset_import:
        raise OnnxError("not an ONNX model (no graph or no opset)", path=path, hint="pass a valid .onnx file")
    check_loadable(model, path)
    return model


# ------------------------------------------------------------------------------ what onnxruntime accepts

_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
# "/onnxruntime_src/onnxruntime/core/graph/model.cc:256 onnxruntime::Model::Model(onnx::ModelProto&&, ...) "
_ORT_WHERE = re.compile(r"^\S+\.(?:h|cc|cpp|hpp):\d+\s+(?:[^()]*::[\w~]+\([^()]*\)(?:\s*const)?\s+)?")


def _ort_message(e: BaseException) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : 1 : FAIL : file.cc:12 Class::f(...)``
    prefix, on one line."""
    text = _ORT_PREFIX.sub("", str(e).strip())
    text = _ORT_WHERE.sub("", text)
    return " ".join(text.split())


def _session_options() -> Any:
    """The cheapest session that still resolves the graph and finds a CPU kernel for every node: no graph
    optimizations, one thread, and onnxruntime's own logging off (the library never prints)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return so


@functools.lru_cache(maxsize=64)
def _ort_refusal(ir_version: int, opset: int) -> str | None:
    """What onnxruntime says when it loads a one-node (Identity) graph stamped with this IR version and
    ai.onnx opset: None when it accepts it, None too when onnxruntime is not installed.

    Why a probe and not a version table: onnxruntime has no public "max opset" API, the table in its docs
    (onnxruntime.ai/docs/reference/compatibility.html) lags releases and custom builds differ, while the
    installed library itself answers exactly (its ``ValidateOpsetForDomain``/IR check runs at model load,
    before any kernel). The probe graph holds no weights, so it costs well under a millisecond (a few ms
    for the very first session of a process) whatever the size of the real model, and it is cached."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return None
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "bncorrect_opset_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    probe.ir_version = ir_version
    try:
        ort.InferenceSession(
            probe.SerializeToString(), _session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        return _ort_message(e) or type(e).__name__
    return None


@functools.lru_cache(maxsize=8)
def _ort_max_opset(ir_version: int, upper: int) -> int:
    """The newest ai.onnx opset below ``upper`` that onnxruntime loads (bisecting :func:`_ort_refusal`)."""
    lo, hi = 1, upper  # lo: accepted (assumed), hi: refused
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _ort_refusal(ir_version, mid) is None:
            lo = mid
        else:
            hi = mid
    return lo


def _ort_version() -> str:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return "?"
    return str(ort.__version__)


_CONVERT_HINT = (
    "re-export the model with an older opset (torch.onnx.export(..., opset_version={good})), or convert it: "
    "onnx.save(onnx.version_converter.convert_version(onnx.load('{name}'), {good}), 'converted.onnx')"
)


def check_loadable(model: onnx.ModelProto, path: str | Path | None = None) -> None:
    """Refuse (:class:`OnnxError` naming ``path``) what onnxruntime could not load, with cheap checks only (no
    session on the model itself): an ai.onnx opset or IR version newer than the installed onnx or
    onnxruntime knows, and tensors whose declared shape does not fit their stored data
    (:func:`tensor_problem`)."""
    name = Path(path).name if path is not None else "model.onnx"
    onnx_max = onnx.defs.onnx_opset_version()
    ir = int(model.ir_version)
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            continue
        v = int(o.version)
        if v > onnx_max:
            raise OnnxError(
                f"the graph declares ai.onnx opset {v}, newer than this onnx package ({onnx.__version__}) "
                f"knows (up to opset {onnx_max}); its operators cannot be checked or run",
                path=path,
                hint=f"re-export the model with an opset this installation runs (torch.onnx.export(..., "
                f"opset_version={min(onnx_max, _ort_max_opset(ir, onnx_max + 1))})); onnx.version_converter "
                f"cannot convert from an opset it does not know. If opset {v} is a released one, upgrade "
                "onnx and onnxruntime",
            )
        refusal = _ort_refusal(ir, v)
        if refusal is not None and "ir version" in refusal.lower():
            raise OnnxError(
                f"onnxruntime {_ort_version()} cannot load a model of IR version {ir}: {shorten(refusal)}",
                path=path,
                hint="re-export the model with an older exporter (or upgrade onnxruntime)",
            )
        if refusal is not None:
            good = _ort_max_opset(ir, v)
            raise OnnxError(
                f"the graph declares ai.onnx opset {v}, newer than the installed onnxruntime "
                f"({_ort_version()}) supports (up to opset {good})",
                path=path,
                hint=_CONVERT_HINT.format(good=good, name=name) + ", or upgrade onnxruntime",
            )
    if ir > onnx.IR_VERSION:
        raise OnnxError(
            f"the model has IR version {ir}, newer than this onnx package ({onnx.__version__}) knows "
            f"(up to {onnx.IR_VERSION})",
            path=path,
            hint="re-export the model with an older exporter, or upgrade onnx and onnxruntime",
        )
    for where, tensor in _all_tensors_deep(model):
        problem = tensor_problem(tensor)
        if problem is not None:
            raise OnnxError(
                f"{where} {problem}",
                path=path,
                hint="the file is damaged (a truncated download or copy) or was written by a broken tool; "
                "export or download it again",
            )


def _bits() -> dict[int, int]:
    """Bits per element of every fixed-size tensor element type this onnx package defines."""
    names = {
        "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
        "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128,
        "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8,
        "FLOAT8E8M0": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2,
    }  # fmt: skip
    return {int(getattr(TensorProto, k)): b for k, b in names.items() if hasattr(TensorProto, k)}


_BITS = _bits()
_T = TensorProto
# Typed (non-raw) storage field of each type (int32_data for the others, sub-byte types packed).
_FIELD = {
    _T.FLOAT: "float_data", _T.COMPLEX64: "float_data", _T.DOUBLE: "double_data",
    _T.COMPLEX128: "double_data", _T.INT64: "int64_data", _T.UINT32: "uint64_data",
    _T.UINT64: "uint64_data", _T.STRING: "string_data",
}  # fmt: skip


def _expected_typed(data_type: int, n: int) -> int | None:
    """How many entries of the typed field hold ``n`` elements of ``data_type`` (None: unknown type)."""
    bits = _BITS.get(data_type)
    if data_type == TensorProto.STRING:
        return n
    if bits is None:
        return None
    if data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * n
    if bits < 8:  # int32_data holds one byte of packed sub-byte elements per entry
        per = 8 // bits
        return -(-n // per)
    return n


def tensor_problem(t: TensorProto) -> str | None:
    """Why a tensor's declared dims do not fit its stored data (e.g. declared 2^40 elements, 16 bytes
    stored; a negative dim), or None. Tensors whose data is still external (not loaded) are not checked."""
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        return f"has a negative dimension (dims {dims})"
    if t.data_location == TensorProto.EXTERNAL or t.HasField("segment"):
        return None
    n = 1
    for d in dims:
        n *= d
    kind = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else "?"
    if t.HasField("raw_data"):
        bits = _BITS.get(t.data_type)
        if bits is None:
            return None
        want = -(-n * bits // 8)
        got = len(t.raw_data)
        if got != want:
            return (
                f"declares dims {dims} ({n} {kind} elements, {want} bytes) but stores {got} bytes of raw data"
            )
        return None
    want_entries = _expected_typed(t.data_type, n)
    if want_entries is None:
        return None
    fname = _FIELD.get(t.data_type, "int32_data")
    got_entries = len(getattr(t, fname))
    if got_entries != want_entries:
        if got_entries == 0 and not any(len(getattr(t, f)) for f in set(_FIELD.values()) | {"int32_data"}):
            return f"declares dims {dims} ({n} {kind} elements) but stores no data"
        return (
            f"declares dims {dims} ({n} {kind} elements) but stores {got_entries} values in {fname} "
            f"({want_entries} expected)"
        )
    return None


def _all_tensors_deep(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """(description, tensor) for every initializer and tensor attribute of the model: main graph,
    control-flow subgraphs and local functions."""

    def graph(g: onnx.GraphProto, where: str) -> Iterator[tuple[str, TensorProto]]:
        for t in g.initializer:
            yield f"initializer {t.name!r}{where}", t
        yield from nodes(g.node, where)

    def nodes(ns: Iterable[onnx.NodeProto], where: str) -> Iterator[tuple[str, TensorProto]]:
        for node in ns:
            who = node.name or f"<unnamed, output {node.output[0] if node.output else '?'}>"
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield f"tensor {a.name!r} of {node.op_type} node {who!r}{where}", a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    for k, t in enumerate(a.tensors):
                        yield f"tensor {a.name}[{k}] of {node.op_type} node {who!r}{where}", t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from graph(a.g, f" (in subgraph {a.name!r} of node {who!r})")
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from graph(g, f" (in subgraph {a.name!r} of node {who!r})")

    yield from graph(model.graph, "")
    for f in model.functions:
        yield from nodes(f.node, f" (in function {f.name!r})")


def _model_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in _all_tensors(model):
        total += len(t.raw_data) + 4 * len(t.float_data) + 8 * (len(t.int64_data) + len(t.double_data))
        total += 4 * len(t.int32_data)
    return total + sum(len(n.SerializeToString()) for n in model.graph.node[:64])


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


# --------------------------------------------------------------------------------- proving the output loads

RUNTIME_OK = "onnxruntime loads it"
#: ``runtime_check`` of a report whose graph was not written (yet).
RUNTIME_NOT_WRITTEN = "not checked: the graph was not written to a file"
_UNREGISTERED = re.compile(r"(?:Fatal error: )?([\w.\-]*):(\w+)\((-?\d+)\) is not a registered function/op")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


class _HasRuntimeCheck(Protocol):
    runtime_check: str


def runtime_check(
    path: str | Path, model: onnx.ModelProto | None = None, *, out: str | Path | None = None
) -> str:
    """Prove onnxruntime (CPU) can load the graph written at ``path``: one session, graph optimizations off.
    Returns :data:`RUNTIME_OK`, or ``"not checked: <why>"`` when the check cannot say anything about the
    graph bncorrect wrote (onnxruntime missing, a model too big to load twice, an op of the input graph
    that onnxruntime does not know or has no CPU kernel for); raises :class:`OnnxError` naming ``out``
    (default ``path``) when onnxruntime refuses the graph for another reason. ``model`` (the proto that was
    written) tells bncorrect's nodes from the input's and sizes the model."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return "not checked: onnxruntime is not installed"
    label = out if out is not None else path
    if model is not None:
        size = _model_bytes(model)
        if size > EXTERNAL_DATA_THRESHOLD:
            return (
                f"not checked: the model holds {size / 1e9:.1f} GB of tensors, which an onnxruntime session "
                "would load into memory once more; check it with onnxruntime.InferenceSession(OUT)"
            )
    try:
        ort.InferenceSession(str(path), _session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = _ort_message(e) or type(e).__name__
        foreign = _foreign_reason(msg, model)
        if foreign is not None:
            return f"not checked: {foreign}"
        raise OnnxError(
            f"onnxruntime {_ort_version()} cannot load the written graph ({shorten(msg, 400)}); "
            "nothing was written",
            path=label,
            hint="if onnxruntime loads the input graph, this is a bncorrect bug: please report it with the "
            "message above and the model's opset; the graph can still be inspected with "
            "onnx.checker.check_model",
            detail=str(e),
        ) from None
    return RUNTIME_OK


def _foreign_reason(msg: str, model: onnx.ModelProto | None) -> str | None:
    """When onnxruntime's refusal concerns an op that bncorrect does not write (a custom-domain op, or a node
    of the input graph without a CPU kernel), why the output cannot be checked here; None otherwise."""
    m = _UNREGISTERED.search(msg)
    if m and m.group(1) not in ("", "ai.onnx"):
        return (
            f"the graph uses op {m.group(2)} of domain {m.group(1)!r}, which onnxruntime does not know "
            "without its custom-op library (register it with SessionOptions.register_custom_ops_library to "
            "load the output)"
        )
    m = _NO_KERNEL.search(msg)
    if m and model is not None:
        node = next((n for n in model.graph.node if n.name == m.group(3)), None)
        if node is not None and not _is_ours(node):
            return (
                f"node {m.group(3)!r} ({m.group(1)}, opset {m.group(2)}) of the input graph has no CPU "
                "kernel in onnxruntime; load the output with the execution provider it was made for"
            )
    return None


@contextlib.contextmanager
def staged_save(
    model: onnx.ModelProto,
    path: str | Path,
    *,
    external_data: bool | None = None,
    check_runtime: bool = True,
    report: _HasRuntimeCheck | None = None,
) -> Iterator[Path]:
    """Write ``model`` to a temporary location beside ``path`` and yield that path; move it into place only
    when the ``with`` body succeeds (so a failed verification leaves no half-written output).

    ``check_runtime``: before yielding, prove onnxruntime loads the staged file (:func:`runtime_check`;
    :class:`OnnxError` and nothing written when it does not); the outcome, or why it was not checked, goes
    to ``report.runtime_check`` when a report is given."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OnnxError(
            f"folder {path.parent} does not exist", path=path, hint=f"create it: mkdir -p {path.parent}"
        )
    if external_data is None:
        external_data = _model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        data_name = f"{path.name}.data"
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # save_model converts tensors in place
            onnx.save_model(
                copy,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
            )
        else:
            onnx.save_model(model, str(tmp))
        if check_runtime:
            outcome = runtime_check(tmp, model, out=path)
            if report is not None:
                report.runtime_check = outcome
        yield tmp
        if external_data and (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmp, path)
    except OSError as e:
        raise OnnxError(
            f"cannot write the model ({e})", path=path, hint="check the folder is writable"
        ) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_onnx(
    model: onnx.ModelProto,
    path: str | Path,
    *,
    external_data: bool | None = None,
    check_runtime: bool = True,
    report: _HasRuntimeCheck | None = None,
) -> Path:
    """Write ``model`` atomically. ``external_data`` None: only models above ~1.8 GB get their tensors in
    ``<name>.data`` beside the file (protobuf cannot hold 2 GB); True/False forces it.

    ``check_runtime`` (default): the staged file must load in onnxruntime (CPU) before it is moved into
    place (:func:`runtime_check`); pass the :class:`RewriteReport` as ``report`` to record the outcome in
    its ``runtime_check`` field. Callers that open a session on the file right away may pass False."""
    path = Path(path)
    with staged_save(model, path, external_data=external_data, check_runtime=check_runtime, report=report):
        pass
    return path


# ------------------------------------------------------------------------------------------ graph index


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise OnnxError("the model imports no ai.onnx opset", hint="pass a valid ONNX model")


class GraphIndex:
    """Producers, consumers, constants and ranks of the main graph of ``model``: how the rewrite looks up a
    tensor's producer, type and shape, and the constant behind a BN parameter (:meth:`resolve`)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.producer: dict[str, int] = {}
        for i, node in enumerate(g.node):
            for o in node.output:
                if o:
                    self.producer[o] = i
        self.init: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.graph_inputs = {v.name for v in g.input}
        self.graph_outputs = {v.name for v in g.output}
        self.types: dict[str, onnx.TypeProto] = {}
        for v in [*g.input, *g.value_info, *g.output]:
            self.types[v.name] = v.type
        self._inferred = False

    def consumers(self, name: str) -> int:
        n = sum(1 for node in self.model.graph.node for i in node.input if i == name)
        return n + (name in self.graph_outputs)

    def tensor_type(self, name: str) -> onnx.TypeProto | None:
        t = self.types.get(name)
        if (t is None or not t.tensor_type.HasField("shape")) and not self._inferred:
            self._infer()
            t = self.types.get(name)
        return t

    def _infer(self) -> None:
        self._inferred = True
        if _model_bytes(self.model) > EXTERNAL_DATA_THRESHOLD:
            return
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False, data_prop=False)
        except Exception:  # shape inference is a best effort here; unknown rank has its own subgraph
            return
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            old = self.types.get(v.name)
            if old is None or not old.tensor_type.HasField("shape"):
                self.types[v.name] = v.type
            elif not old.tensor_type.elem_type and v.type.tensor_type.elem_type:
                merged = onnx.TypeProto()
                merged.CopyFrom(old)
                merged.tensor_type.elem_type = v.type.tensor_type.elem_type
                self.types[v.name] = merged

    def rank(self, name: str) -> int | None:
        t = self.tensor_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def dims(self, name: str) -> tuple[int | str | None, ...] | None:
        t = self.tensor_type(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
            for d in t.tensor_type.shape.dim
        )

    def known_elem_type(self, name: str) -> int | None:
        """The element type of tensor ``name`` from the graph's inputs/value_info/outputs, else from shape
        inference (on a copy, strict mode off, errors tolerated); None when neither says."""
        t = self.types.get(name)
        if (t is None or not t.tensor_type.elem_type) and not self._inferred:
            self._infer()
            t = self.types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            return int(t.tensor_type.elem_type)
        return None

    def elem_type(self, name: str, fallback: int) -> int:
        """:meth:`known_elem_type`, or ``fallback`` when the type is unknown."""
        known = self.known_elem_type(name)
        return fallback if known is None else known

    def resolve(self, name: str, label: str) -> tuple[np.ndarray | None, str | None]:
        """The constant behind tensor ``name`` (through Identity/Constant nodes): (array, None) or
        (None, reason)."""
        seen = set()
        while True:
            if name in self.init:
                try:
                    return numpy_helper.to_array(self.init[name]), None
                except Exception as e:
                    return None, f"{label} initializer {name!r} cannot be read ({e})"
            idx = self.producer.get(name)
            if idx is None:
                if name in self.graph_inputs:
                    return None, f"{label} ({name!r}) is a graph input fed at run time, not a constant"
                return None, f"{label} ({name!r}) is not produced by any node or initializer"
            if idx in seen:
                return None, f"{label} ({name!r}) is produced by a cycle"
            seen.add(idx)
            node = self.model.graph.node[idx]
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                name = node.input[0]
                continue
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node)
                if value is None:
                    return None, f"{label} comes from Constant node {node.name!r} of an unsupported kind"
                return value, None
            who = node.name or f"<unnamed {node.op_type} node producing {name!r}>"
            return None, (
                f"{label} ({name!r}) is computed by node {who!r} ({node.op_type}), not stored as a constant; "
                "fold constants first (e.g. onnxscript.optimizer.fold_constants or onnxsim)"
            )


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_ours(node: onnx.NodeProto) -> bool:
    """A node of a subgraph bncorrect wrote (doc_string mark, or its name if doc strings were stripped)."""
    return node.doc_string.startswith(MARK) or "/bncorrect/" in node.name


# --------------------------------------------------------------------------------------- finding layers


@dataclass
class OnnxNormLayer:
    """One BatchNormalization node of an ONNX graph."""

    name: str
    node_index: int
    channels: int
    eps: float
    rank: int | None
    param_names: dict[str, str]
    correctable: bool
    reason: str | None
    torch_name: str | None
    dtype: str | None = None
    #: why the stored statistics/affine parameters are unusable (NaN, Inf, negative variance; from
    #: :func:`bncorrect.health.statistics_problem`), None when they are fine. Also the ``reason``.
    stats_problem: str | None = None

    def summary(self) -> dict[str, object]:
        """JSON-friendly description."""
        return {
            "name": self.name,
            "type": _BN,
            "channels": self.channels,
            "eps": self.eps,
            "rank": self.rank,
            "dtype": self.dtype,
            "correctable": self.correctable,
            "reason": self.reason,
            "torch_name": self.torch_name,
            "params": dict(self.param_names),
            "stats_problem": self.stats_problem,
        }


def _torch_name(param_names: Mapping[str, str], node: onnx.NodeProto) -> str | None:
    """PyTorch module path from parameter names like ``layer1.0.bn1.running_mean`` (all must agree)."""
    prefixes = set()
    for key, value in param_names.items():
        suffix = "." + _TORCH_SUFFIX[key]
        if value.endswith(suffix) and len(value) > len(suffix):
            prefixes.add(value[: -len(suffix)])
    if len(prefixes) == 1:
        return prefixes.pop()
    for (
        p
    ) in node.metadata_props:  # torch.onnx dynamo exporter: ['', 'layer1', 'layer1.0', 'layer1.0.bn1', op]
        if p.key == "pkg.torch.onnx.name_scopes":
            with contextlib.suppress(ValueError, SyntaxError):
                import ast

                scopes = ast.literal_eval(p.value)
                if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                    return str(scopes[-2])
    return None


def _layer_names(model: onnx.ModelProto) -> dict[int, str]:
    """Stable unique names for BN nodes: the node name, or ``BatchNormalization:<output>`` when unnamed;
    ``#k`` appended when several nodes share a name."""
    g = model.graph
    counts: dict[str, int] = {}
    for node in g.node:
        if node.name:
            counts[node.name] = counts.get(node.name, 0) + 1
    out: dict[int, str] = {}
    seen: dict[str, int] = {}
    for i, node in enumerate(g.node):
        if node.op_type != _BN or node.domain not in ("", "ai.onnx") or _is_ours(node):
            continue
        base = node.name or f"{_BN}:{node.output[0]}"
        if counts.get(base, 0) > 1:
            k = seen.get(base, 0)
            seen[base] = k + 1
            base = f"{base}#{k}"
        out[i] = base
    return out


def _check_layer(
    index: GraphIndex, node: onnx.NodeProto, opset: int
) -> tuple[dict[str, np.ndarray], str | None, str | None]:
    """The check of pattern -> check -> rewrite: (parameter arrays, why it cannot be corrected or None,
    the same reason when it is about broken statistics (:func:`statistics_problem`) or None)."""
    params, reason = _check_node(index, node, opset)
    if reason is not None:
        return params, reason, None
    problem = statistics_problem(params["mean"], params["var"], params["scale"], params["bias"])
    if problem is not None:
        return params, problem, problem
    x_type = _x_type(index, node, params)
    if x_type not in _FLOAT_TYPES:
        return params, f"input of type {TensorProto.DataType.Name(x_type)} is not floating point", None
    return params, None, None


def _x_type(index: GraphIndex, node: onnx.NodeProto, params: Mapping[str, np.ndarray]) -> int:
    """The BN input's element type: declared or inferred for the input, else for the output (same type T),
    else the parameters' type (equal to T before opset 15, where T and T1/T2 may first differ)."""
    known = index.known_elem_type(node.input[0])
    if known is None and node.output and node.output[0]:
        known = index.known_elem_type(node.output[0])
    if known is None:
        mean = params.get("mean")
        return TensorProto.FLOAT if mean is None else _np_elem_type(mean)
    return known


def _check_node(
    index: GraphIndex, node: onnx.NodeProto, opset: int
) -> tuple[dict[str, np.ndarray], str | None]:
    if opset < MIN_OPSET:
        return {}, f"opset {opset} < {MIN_OPSET}: convert with onnx.version_converter first"
    if len(node.input) < 5:
        return {}, "node has fewer than 5 inputs"
    if int(_attr(node, "training_mode", 0)) != 0:
        return {}, "training_mode=1: the node normalizes with batch statistics; export the model in eval mode"
    if int(_attr(node, "spatial", 1)) != 1:
        return {}, "spatial=0 (per-activation BN) is not supported"
    extra = [o for o in node.output[1:] if o]
    if extra:
        return {}, (
            f"the node has training outputs ({', '.join(extra)}), i.e. it runs in training mode; "
            "export the model in eval mode"
        )
    params: dict[str, np.ndarray] = {}
    for key, name in zip(_PARAMS, node.input[1:5], strict=True):
        value, reason = index.resolve(name, key)
        if reason is not None or value is None:
            return params, reason
        params[key] = value
    c = params["mean"].size
    if any(v.ndim != 1 or v.size != c for v in params.values()):
        return params, f"parameters of unexpected shapes { ({k: v.shape for k, v in params.items()}) }"
    if not all(np.issubdtype(v.dtype, np.floating) for v in params.values()):
        return params, "parameters are not floating point"
    return params, None


def _np_elem_type(a: np.ndarray) -> int:
    return int(helper.np_dtype_to_tensor_dtype(a.dtype))


def find_bn_nodes(model: onnx.ModelProto) -> list[OnnxNormLayer]:
    """Every BatchNormalization node of the main graph (not the ones bncorrect itself wrote), in order."""
    index = GraphIndex(model)
    opset = _opset(model)
    names = _layer_names(model)
    layers = []
    for i, name in names.items():
        node = model.graph.node[i]
        params, reason, stats_problem = _check_layer(index, node, opset)
        param_names = dict(zip(_PARAMS, node.input[1:5], strict=False))
        channels = next((int(v.size) for v in params.values()), 0)
        rank = index.rank(node.input[0])
        x_type = _x_type(index, node, params) if len(node.input) else TensorProto.FLOAT
        layers.append(
            OnnxNormLayer(
                name=name,
                node_index=i,
                channels=channels,
                eps=float(_attr(node, "epsilon", 1e-5)),
                rank=rank,
                param_names=param_names,
                correctable=reason is None,
                reason=reason,
                torch_name=_torch_name(param_names, node),
                dtype=TensorProto.DataType.Name(x_type).lower(),
                stats_problem=stats_problem,
            )
        )
    return layers


def _nested_bn_count(model: onnx.ModelProto) -> int:
    def count(nodes: Iterable[onnx.NodeProto]) -> int:
        n = 0
        for node in nodes:
            n += node.op_type == _BN
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += count(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    n += sum(count(g.node) for g in a.graphs)
        return n

    inner = sum(count(f.node) for f in model.functions)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                inner += count(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                inner += sum(count(g.node) for g in a.graphs)
    return inner


def require_bn_nodes(model: onnx.ModelProto, *, source: str | Path | None = None) -> list[OnnxNormLayer]:
    """:func:`find_bn_nodes`, raising :class:`NoBatchNormError` with the right explanation when empty."""
    layers = find_bn_nodes(model)
    if layers:
        return layers
    g = model.graph
    if any(_is_ours(n) for n in g.node):
        raise NoBatchNormError(
            "this graph was already rewritten by bncorrect and has no plain BatchNormalization node left",
            path=source,
            hint="apply corrections to the original (uncorrected) ONNX graph",
        )
    if _nested_bn_count(model):
        raise NoBatchNormError(
            "the BatchNormalization nodes are inside local functions or control-flow subgraphs",
            path=source,
            hint="inline them first (onnx.inliner.inline_local_functions) or re-export without functions",
        )
    convs = sum(n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") for n in g.node)
    what = (
        f"the graph has {convs} Conv/Gemm/MatMul nodes and no BatchNormalization node"
        if convs
        else ("the graph has no BatchNormalization node")
    )
    raise NoBatchNormError(
        what,
        path=source,
        hint=FOLDED_BN_HINT
        if convs
        else (
            "bncorrect corrects BatchNorm layers; this model has none (or its BN was folded away: "
            + FOLDED_BN_HINT
            + ")"
        ),
    )


# ----------------------------------------------------------------------------------------------- matching

_STRIP_PREFIXES = ("p_", "b_", "model_", "module_", "_orig_mod_")


def _norm_key(name: str) -> str:
    key = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")
    return key


def _param_keys(layer: OnnxNormLayer) -> set[str]:
    """Normalised module paths recoverable from the parameter names (``b_layer1_0_bn1_running_mean`` ->
    ``layer1_0_bn1``)."""
    keys = set()
    for key, value in layer.param_names.items():
        v = _norm_key(value)
        suffix = "_" + _TORCH_SUFFIX[key]
        if v.endswith(suffix) and len(v) > len(suffix):
            stem = v[: -len(suffix)]
            keys.add(stem)
            for p in _STRIP_PREFIXES:
                if stem.startswith(p) and len(stem) > len(p):
                    keys.add(stem[len(p) :])
    if layer.torch_name:
        keys.add(_norm_key(layer.torch_name))
    return keys


def match_layers(
    model: onnx.ModelProto, names: Iterable[str], *, source: str | Path | None = None
) -> dict[str, str]:
    """Map layer names from a corrections file (ONNX node names or PyTorch module paths such as
    ``layer1.0.bn1``) to BN node names. Exact node names win, then PyTorch paths recovered from the BN
    parameter names (``layer1.0.bn1.running_mean``), then the same compared with punctuation folded
    (``b_layer1_0_bn1_running_mean``). :class:`OnnxError` lists unknown and ambiguous names."""
    layers = require_bn_nodes(model, source=source)
    by_node = {ly.name: ly for ly in layers}
    out: dict[str, str] = {}
    unknown: list[str] = []
    ambiguous: list[str] = []
    for name in names:
        cands = {ly.name for ly in layers if ly.name == name or ly.torch_name == name}
        if not cands:
            key = _norm_key(name)
            cands = {ly.name for ly in layers if key in _param_keys(ly) or _norm_key(ly.name) == key}
        if not cands:
            unknown.append(name)
        elif len(cands) > 1:
            ambiguous.append(f"{name} -> {', '.join(sorted(cands))}")
        else:
            out[name] = cands.pop()
    taken: dict[str, list[str]] = {}
    for k, v in out.items():
        taken.setdefault(v, []).append(k)
    ambiguous += [f"{' and '.join(ks)} -> {v}" for v, ks in taken.items() if len(ks) > 1]
    if unknown or ambiguous:
        parts = []
        if unknown:
            parts.append(
                f"not found in the graph: {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else "")
            )
        if ambiguous:
            parts.append(f"ambiguous: {'; '.join(ambiguous[:8])}" + (" ..." if len(ambiguous) > 8 else ""))
        known = ", ".join(
            f"{ly.name}" + (f" ({ly.torch_name})" if ly.torch_name and ly.torch_name != ly.name else "")
            for ly in list(by_node.values())[:6]
        )
        raise OnnxError(
            "cannot match the corrections to the graph's BatchNormalization nodes: " + "; ".join(parts),
            path=source,
            hint=f"the graph's BN layers are: {known}{' ...' if len(by_node) > 6 else ''}. Use a corrections "
            "file made for the PyTorch model this graph was exported from, or name layers by ONNX node name",
        )
    return out


# --------------------------------------------------------------------------------------------- building


class Builder:
    """Emits the nodes and initializers of one layer's subgraph (opset-aware helpers, unique names)."""

    def __init__(
        self, prefix: str, opset: int, taken: set[str], shared: dict[str, str], stats_type: int
    ) -> None:
        self.prefix = prefix
        self.opset = opset
        self.taken = taken
        self.shared = shared  # key -> initializer name, reused across layers
        self.stats_type = stats_type
        self.np_dtype = helper.tensor_dtype_to_np_dtype(stats_type)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.shared_inits: list[TensorProto] = []

    def fresh(self, hint: str) -> str:
        base = f"{self.prefix}/{hint}"
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name

    def const(self, hint: str, value: Any, dtype: Any = None) -> str:
        arr = np.asarray(value, dtype=self.np_dtype if dtype is None else dtype)
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def shared_const(self, key: str, value: Any, dtype: Any) -> str:
        full = f"bncorrect/{key}"
        if full not in self.shared:
            arr = np.asarray(value, dtype=dtype)
            name = full
            k = 1
            while name in self.taken:
                name = f"{full}_{k}"
                k += 1
            self.taken.add(name)
            self.shared[full] = name
            self.shared_inits.append(numpy_helper.from_array(arr, name))
        return self.shared[full]

    def shape(self, values: list[int]) -> str:
        return self.shared_const(
            "shape_" + "_".join(str(v).replace("-", "m") for v in values), values, np.int64
        )

    def op(
        self,
        op_type: str,
        inputs: list[str],
        hint: str | None = None,
        *,
        out: str | None = None,
        n_out: int = 1,
        **attrs: Any,
    ) -> str:
        outs = (
            [out]
            if out is not None and n_out == 1
            else [self.fresh(f"{hint or op_type}") for _ in range(n_out)]
        )
        node = helper.make_node(op_type, inputs, outs, name=self.fresh(f"{hint or op_type}_node"), **attrs)
        node.doc_string = f"{MARK} corrected BatchNormalization (DESIGN §2), part of {self.prefix}"
        self.nodes.append(node)
        return outs[0]

    def ops(
        self, op_type: str, inputs: list[str], n_out: int, hint: str | None = None, **attrs: Any
    ) -> list[str]:
        outs = [self.fresh(f"{hint or op_type}_{k}") for k in range(n_out)]
        node = helper.make_node(op_type, inputs, outs, name=self.fresh(f"{hint or op_type}_node"), **attrs)
        node.doc_string = f"{MARK} corrected BatchNormalization (DESIGN §2), part of {self.prefix}"
        self.nodes.append(node)
        return outs

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int, hint: str | None = None) -> str:
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, [x, self.shape(axes)], hint, keepdims=keepdims)
        return self.op(op_type, [x], hint, axes=axes, keepdims=keepdims)

    def batch_size(self, x: str, dim: int | str | None = None) -> str:
        """(1,) int64 tensor holding N = x.shape[0]: a constant when static, one Shape node per symbolic
        batch dimension (shared by every layer whose input has that dimension), else per layer."""
        if isinstance(dim, int) and dim > 0:
            return self.shared_const(f"N_{dim}", [dim], np.int64)
        key = f"N:{dim}" if isinstance(dim, str) and dim else None
        if key is not None and key in self.shared:
            return self.shared[key]
        if self.opset >= 15:
            out = self.op("Shape", [x], "N", start=0, end=1)
        else:
            shape = self.op("Shape", [x], "shape")
            if self.opset >= 10:
                out = self.op("Slice", [shape, self.shape([0]), self.shape([1])], "N")
            else:
                out = self.op("Slice", [shape], "N", starts=[0], ends=[1])
        if key is not None:
            self.shared[key] = out
        return out


@dataclass
class LayerPlan:
    """Everything a subgraph builder needs for one layer (arrays in float64)."""

    name: str
    x: str
    y: str
    rank: int | None
    x_type: int
    stats_type: int
    eps: float
    gamma: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    alpha: np.ndarray  # () or (C,)
    beta: np.ndarray
    shape: tuple[int | str | None, ...] | None = None  # x's dims when known: int, symbol or None

    @property
    def batch_dim(self) -> int | str | None:
        return self.shape[0] if self.shape else None

    def spatial_dims(self, rank: int) -> tuple[int, ...] | None:
        """Static spatial dims when all are known and the graph's rank is used as is."""
        if self.shape is None or len(self.shape) != rank or self.rank is None:
            return None
        dims = self.shape[2:]
        return tuple(int(d) for d in dims) if all(isinstance(d, int) and d > 0 for d in dims) else None

    @property
    def channels(self) -> int:
        return int(self.mean.size)

    def per_channel(self, v: np.ndarray, rank: int) -> np.ndarray:
        """Shape a () or (C,) array to broadcast against (N, C, 1, ...) of ``rank`` dims."""
        v = np.asarray(v, dtype=np.float64)
        return v if v.ndim == 0 else v.reshape((-1,) + (1,) * (rank - 2))


BuildFn = Callable[[Builder, LayerPlan], None]


def cast_in(b: Builder, p: LayerPlan) -> str:
    """The layer's input ``p.x`` in the statistics type (a Cast node when the input is fp16/bf16)."""
    return p.x if p.x_type == p.stats_type else b.op("Cast", [p.x], "x_f", to=p.stats_type)


def statistics_input(b: Builder, p: LayerPlan) -> tuple[str, int]:
    """(x, rank) the per-example statistics are taken over: ``p.x`` in the statistics type, viewed as
    (N, C, L) when its rank is unknown (which covers any rank >= 2; (N, C) becomes L = 1: var_i = 0)."""
    x = cast_in(b, p)
    if p.rank is None:
        return b.op("Reshape", [x, b.shape([0, 0, -1])], "x_ncl"), 3
    return x, p.rank


def finish_layer(b: Builder, p: LayerPlan, y: str, op_type: str, inputs: list[str], **attrs: Any) -> None:
    """Emit the layer's last op (``op_type`` on ``inputs``, name hint ``y``) so that its result, cast back to
    the input type if needed, is named ``p.y``: the BN node's output, which the rest of the graph reads."""
    if p.x_type == p.stats_type:
        b.op(op_type, inputs, y, out=p.y, **attrs)
    else:
        r = b.op(op_type, inputs, y, **attrs)
        b.op("Cast", [r], "y_cast", out=p.y, to=p.x_type)


def build_rank2(b: Builder, p: LayerPlan) -> None:
    """(N, C) input: mu_i = x, var_i = 0, everything elementwise on small tensors."""
    a, be = p.alpha, p.beta
    x = cast_in(b, p)
    d = b.op("Sub", [x, b.const("mean", p.mean)], "d")
    g1 = b.const("gamma_1ma", p.gamma * (1.0 - a))
    num = b.op("Mul", [d, g1], "num")
    c0 = (1.0 - be) * p.var + p.eps
    bb = be * (1.0 - be)
    if not np.any(bb):
        scaled = b.op("Mul", [num, b.const("inv_std", 1.0 / np.sqrt(c0))], "scaled")
    else:
        dd = b.op("Mul", [d, d], "d2")
        v = b.op("Add", [b.op("Mul", [dd, b.const("bb", bb)], "bb_d2"), b.const("c0", c0)], "var_hat_eps")
        scaled = b.op("Div", [num, b.op("Sqrt", [v], "std_hat")], "scaled")
    finish_layer(b, p, "y", "Add", [scaled, b.const("bias", p.bias)])


def example_stats_nodes(b: Builder, p: LayerPlan, x: str, r: int) -> tuple[str, str | None, bool]:
    """Nodes for the per-(example, channel) statistics of ``x`` (rank ``r``, module docstring):
    (mu_i, v, is_inv_std) of shape (N, C, 1, ...), ``v`` 1/sqrt(var_i) (LayerNormalization, opset >= 17) or
    var_i (exact two-pass, older opsets); None when beta = 0 (no variance needed)."""
    axes = list(range(2, r))
    if not np.any(p.beta):
        return b.reduce("ReduceMean", x, axes, 1, "mu_i"), None, False
    if b.opset >= 17:
        mu, inv_std = _layernorm_stats(b, p, x, r)
        return mu, inv_std, True
    mu = b.reduce("ReduceMean", x, axes, 1, "mu_i")
    xc = b.op("Sub", [x, mu], "x_centered")
    return mu, b.reduce("ReduceMean", b.op("Mul", [xc, xc], "x_centered_sq"), axes, 1, "var_i"), False


def _coef_const(b: Builder, hint: str, v: np.ndarray, pc: Callable[[np.ndarray], np.ndarray]) -> str:
    """A coefficient as a constant: a scalar when it is one value (broadcasts anywhere), else ``pc(v)``."""
    v = np.asarray(v, dtype=np.float64)
    return b.const(hint, v if v.ndim == 0 else pc(v))


def build_fast(b: Builder, p: LayerPlan, *, stats: str | None = None) -> None:
    """The formulation of the module docstring (rank >= 3, or rank unknown). ``stats``: "layernorm" or
    "two-pass" to force the statistics (default: as the docstring says, by batch dimension and opset; for
    benchmarks)."""
    x, r = statistics_input(b, p)
    rank = p.rank
    a, be = p.alpha, p.beta
    batch = p.batch_dim if isinstance(p.batch_dim, int) and p.batch_dim > 0 else None
    if stats == "layernorm" and b.opset < 17:
        raise ValueError("LayerNormalization needs opset >= 17")
    flat_path = batch is not None and rank is not None and np.any(be) and stats != "layernorm"
    if flat_path:  # static batch size: the (1, N*C, ...) two-pass path, at every opset (module docstring)
        _build_flat_two_pass(b, p, x, r, batch)
        return
    use_ln = (b.opset >= 17) if stats is None else stats == "layernorm"
    pc = lambda v: p.per_channel(v, r)  # noqa: E731
    flat = b.shape([-1])
    src = x
    d: str | None = None
    if not np.any(be):  # mu_hat only
        mu = b.reduce("ReduceMean", x, list(range(2, r)), 1, "mu_i")
        v_in = None
    elif use_ln:
        mu, inv_std = _layernorm_stats(b, p, x, r)
        beta_var = b.op("Div", [_coef_const(b, "beta", be, pc), b.op("Mul", [inv_std, inv_std], "inv_var")])
        v_terms = [beta_var]
    else:  # exact two-pass; the affine then runs on the centred x (mean input (alpha - 1) d, no mu_hat)
        mu = b.reduce("ReduceMean", x, list(range(2, r)), 1, "mu_i")
        src = b.op("Sub", [x, mu], "x_centered")
        var_i = b.reduce(
            "ReduceMean", b.op("Mul", [src, src], "x_centered_sq"), list(range(2, r)), 1, "var_i"
        )
        v_terms = [b.op("Mul", [var_i, _coef_const(b, "beta", be, pc)], "beta_var_i")]
    if np.any(be):
        bb = be * (1.0 - be)
        if np.any(bb) or src is not x:
            d = b.op("Sub", [mu, b.const("mean", pc(p.mean))], "d")
        if np.any(bb):
            v_terms.append(b.op("Mul", [b.op("Mul", [d, d], "d2"), _coef_const(b, "bb", bb, pc)], "bb_d2"))
        ce = (1.0 - be) * p.var
        if np.any(ce):
            v_terms.append(b.const("var_1mb", pc(ce)))
        var_hat = b.op("Sum", v_terms, "var_hat") if len(v_terms) > 1 else v_terms[0]
        v_in = b.op("Reshape", [var_hat, flat], "var_hat_flat")
    n = None if batch is not None else b.batch_size(x, p.batch_dim)

    def tiled(hint: str, v: np.ndarray) -> str:
        if batch is not None:  # static batch: a constant, no run-time Tile
            return b.const(hint + "_tiled", np.tile(v, batch))
        return b.op("Tile", [b.const(hint, v), n], hint + "_tiled")

    if src is not x:  # centred input: BN mean input mu_hat - mu_i = (alpha - 1) d
        if np.any(a != 1.0):
            m = b.op("Mul", [d, _coef_const(b, "alpha_m1", a - 1.0, pc)], "m")
            m_in = b.op("Reshape", [m, flat], "m_flat")
        else:
            m_in = tiled("zeros", np.zeros(p.channels))
    elif np.any(a):  # mu_hat = mu_E + alpha * (mu_i - mu_E)
        ca = _coef_const(b, "alpha", a, pc)
        mu_hat = b.op(
            "Add", [b.op("Mul", [mu, ca], "alpha_mu"), b.const("mean_1ma", pc((1.0 - a) * p.mean))], "mu_hat"
        )
        m_in = b.op("Reshape", [mu_hat, flat], "mu_hat_flat")
    else:
        m_in = tiled("mean", p.mean)
    if v_in is None:
        v_in = tiled("var", p.var)
    g_in = tiled("gamma", p.gamma)
    b_in = tiled("bias", p.bias)
    xv = b.op("Reshape", [src, b.shape([1, -1] + [0] * (r - 2))], "x_view")
    yv = b.op(_BN, [xv, g_in, b_in, m_in, v_in], "y_view", epsilon=float(p.eps))
    back = b.shape([-1, p.channels] + [0] * (r - 2)) if rank is not None else b.op("Shape", [p.x], "x_shape")
    finish_layer(b, p, "y", "Reshape", [yv, back])


def _layernorm_stats(b: Builder, p: LayerPlan, x: str, r: int) -> tuple[str, str]:
    """(mu_i, 1 / sqrt(var_i)) of shape (N, C, 1, ...) from one LayerNormalization (opset >= 17)."""
    spatial = p.spatial_dims(r)
    if spatial is not None:  # a full-shape scale: onnxruntime's broadcast-scale path is ~10x slower
        ones = b.shared_const("ones_" + "x".join(map(str, spatial)), np.ones(spatial), b.np_dtype)
    else:
        one = numpy_helper.from_array(np.ones(1, dtype=b.np_dtype))
        ones = b.op("ConstantOfShape", [b.op("Shape", [x], "spatial_shape", start=2)], "ones", value=one)
    _, mu, inv_std = b.ops("LayerNormalization", [x, ones], 3, "stats", axis=2, epsilon=0.0)
    return mu, inv_std


def _build_flat_two_pass(b: Builder, p: LayerPlan, x: str, r: int, batch: int) -> None:
    """Static batch size N, beta != 0 (any opset): everything on the (1, N*C, *spatial) view, the
    per-channel terms tiled N times as constants, so no run-time shape arithmetic and no reshapes of the
    statistics."""
    nc = batch * p.channels
    axes = list(range(2, r))

    def per_nc(hint: str, v: np.ndarray) -> str:  # a coefficient: scalar, or (C,) tiled to (N*C,)
        v = np.asarray(v, dtype=np.float64)
        return b.const(hint, v if v.ndim == 0 else np.tile(v, batch))

    xv = b.op("Reshape", [x, b.shape([1, nc] + [0] * (r - 2))], "x_view")
    mu = b.reduce("ReduceMean", xv, axes, 1, "mu_i")  # (1, N*C, 1, ...)
    xc = b.op("Sub", [xv, mu], "x_centered")
    var_i = b.reduce("ReduceMean", b.op("Mul", [xc, xc], "x_centered_sq"), [0, *axes], 0, "var_i")  # (N*C,)
    mu_f = b.op("Reshape", [mu, b.shape([-1])], "mu_i_flat")
    a, be = p.alpha, p.beta
    d = b.op("Sub", [mu_f, per_nc("mean_tiled", p.mean)], "d")
    terms = [b.op("Mul", [var_i, per_nc("beta", be)], "beta_var_i")]
    bb = be * (1.0 - be)
    if np.any(bb):
        terms.append(b.op("Mul", [b.op("Mul", [d, d], "d2"), per_nc("bb", bb)], "bb_d2"))
    ce = (1.0 - be) * p.var
    if np.any(ce):
        terms.append(b.const("var_1mb_tiled", np.tile(ce, batch)))
    var_hat = b.op("Sum", terms, "var_hat") if len(terms) > 1 else terms[0]
    if np.any(a != 1.0):  # BN mean input mu_hat - mu_i = (alpha - 1) d
        m = b.op("Mul", [d, per_nc("alpha_m1", a - 1.0)], "m")
    else:
        m = b.const("zeros_tiled", np.zeros(nc))
    yv = b.op(
        _BN,
        [xc, b.const("gamma_tiled", np.tile(p.gamma, batch)), b.const("bias_tiled", np.tile(p.bias, batch)),
         m, var_hat],
        "y_view",
        epsilon=float(p.eps),
    )  # fmt: skip
    finish_layer(b, p, "y", "Reshape", [yv, b.shape([batch, p.channels] + [0] * (r - 2))])


def build_default(b: Builder, p: LayerPlan) -> None:
    """Pick the subgraph for the layer's rank."""
    if p.rank == 2:
        build_rank2(b, p)
    else:
        build_fast(b, p)


# ---------------------------------------------------------------------------------------------- rewrite


@dataclass
class RewriteReport:
    """What :func:`rewrite` did: node names rewritten, kept as plain BN, skipped (with the reason)."""

    rewritten: list[str] = field(default_factory=list)
    recalibrated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    opset: int = 0
    formulation: str = "layernorm-stats + bn-view"
    notes: list[str] = field(default_factory=list)
    #: whether onnxruntime loads the written graph: :data:`RUNTIME_OK` ("onnxruntime loads it"), or
    #: "not checked: <why>" (set by :func:`save_onnx` when given this report; :data:`RUNTIME_NOT_WRITTEN`
    #: until then).
    runtime_check: str = RUNTIME_NOT_WRITTEN

    def summary(self) -> dict[str, object]:
        """JSON-friendly report."""
        return {
            "rewritten": list(self.rewritten),
            "recalibrated": list(self.recalibrated),
            "kept": list(self.kept),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "opset": self.opset,
            "formulation": self.formulation,
            "notes": list(self.notes),
            "runtime_check": self.runtime_check,
        }


def _coef(value: Any, name: str, label: str, channels: int, source: str | Path | None) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.size != channels):
        raise OnnxError(
            f"{label} for layer {name} has shape {list(arr.shape)} but the layer has {channels} channels",
            path=source,
            hint="use a scalar or a vector of length C per layer (a corrections file made for this model)",
        )
    if arr.ndim == 1 and arr.size and np.all(arr == arr.flat[0]):
        arr = np.asarray(arr.flat[0])
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise OnnxError(f"{label} for layer {name} must lie in [0, 1], got {arr.tolist()}", path=source)
    return arr


def _stat(value: Any, name: str, label: str, channels: int, source: str | Path | None) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (channels,):
        problem = f"has shape {list(arr.shape)}, but the layer has {channels} channels"
    elif not np.all(np.isfinite(arr)):
        problem = f"holds {int((~np.isfinite(arr)).sum())} NaN or infinite values"
    elif label == "running_var" and np.any(arr < 0):
        problem = f"has {int((arr < 0).sum())} negative entries"
    else:
        return arr
    raise OnnxError(
        f"{label} for layer {name} {problem}",
        path=source,
        hint="use statistics computed for this graph (e.g. `bncorrect recalibrate` on it)",
    )


def rewrite(
    model: onnx.ModelProto,
    alpha: Mapping[str, Coefficient],
    beta: Mapping[str, Coefficient],
    *,
    running_stats: Mapping[str, tuple[Any, Any]] | None = None,
    source: str | Path | None = None,
) -> tuple[onnx.ModelProto, RewriteReport]:
    """Return a copy of ``model`` with the named BN nodes corrected, and a report.

    Keys of ``alpha``/``beta``/``running_stats`` are BN node names (see :func:`find_bn_nodes`; map
    PyTorch names with :func:`match_layers`). A layer missing from ``beta`` gets beta = alpha; missing
    from ``alpha`` gets 0. alpha = beta = 0 keeps the node untouched, or (with ``running_stats``) keeps
    a plain BN fed with the new statistics. ``source`` is the file name used in error messages.
    """
    return rewrite_with(model, alpha, beta, running_stats=running_stats, source=source, build=build_default)


def rewrite_with(
    model: onnx.ModelProto,
    alpha: Mapping[str, Coefficient],
    beta: Mapping[str, Coefficient],
    *,
    running_stats: Mapping[str, tuple[Any, Any]] | None = None,
    source: str | Path | None = None,
    build: BuildFn = build_default,
    formulation: str | None = None,
    check: bool = True,
) -> tuple[onnx.ModelProto, RewriteReport]:
    """:func:`rewrite` with the subgraph of each rewritten node made by ``build`` (default: the corrected
    layer of the module docstring), ``formulation`` recorded in the report, and (``check``) the result
    checked with ``onnx.checker``. Every BN node with a non-zero ``alpha``/``beta`` gets a :class:`LayerPlan`
    and is replaced by the nodes ``build`` adds to its :class:`Builder`; the finishing op names its result
    after the BN's output (:func:`finish_layer`)."""
    layers = require_bn_nodes(model, source=source)
    opset = _opset(model)
    report = RewriteReport(opset=opset)
    report.formulation = formulation or (
        "LayerNormalization statistics (symbolic batch) or two-pass ReduceMean statistics (static batch) + "
        "BatchNormalization over a (1, N*C, ...) view"
        if opset >= 17
        else "two-pass ReduceMean statistics + BatchNormalization over a (1, N*C, ...) view of x - mu_i"
    )
    by_name = {ly.name: ly for ly in layers}
    stats = dict(running_stats or {})
    wanted = set(alpha) | set(beta) | set(stats)
    unknown = sorted(wanted - set(by_name))
    if unknown:
        raise OnnxError(
            f"no BatchNormalization node named {', '.join(unknown[:8])}"
            + (" ..." if len(unknown) > 8 else ""),
            path=source,
            hint="name layers by ONNX node name, or map PyTorch names with match_layers()",
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    index = GraphIndex(out)
    taken = set(index.producer) | set(index.init) | index.graph_inputs | index.graph_outputs
    taken |= {n.name for n in g.node if n.name} | {v.name for v in g.value_info}
    shared: dict[str, str] = {}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[TensorProto] = []
    dropped_params: set[str] = set()
    # IR < 4: every initializer must also be a graph input, i.e. a value a caller may feed instead; the
    # constants bncorrect adds are Constant nodes there, so none of them becomes such an input.
    as_constants = out.ir_version < 4
    for ly in layers:
        if ly.name not in wanted:
            report.kept.append(ly.name)
            continue
        node = g.node[ly.node_index]
        params, reason, problem = _check_layer(index, node, opset)
        if problem is not None and ly.name in stats:  # broken stored statistics that are being replaced
            new_mean, new_var = stats[ly.name]
            if statistics_problem(new_mean, new_var, params["scale"], params["bias"]) is None:
                x_type = _x_type(index, node, params)
                reason = None if x_type in _FLOAT_TYPES else f"input of type {x_type} is not floating point"
        if reason is not None:
            report.skipped.append((ly.name, reason))
            continue
        c = ly.channels
        a_raw = alpha.get(ly.name)
        b_raw = beta.get(ly.name)
        a = _coef(0.0 if a_raw is None else a_raw, ly.name, "alpha", c, source)
        b = _coef(a if b_raw is None else b_raw, ly.name, "beta", c, source)
        mean = params["mean"].astype(np.float64)
        var = params["var"].astype(np.float64)
        if ly.name in stats:
            rm, rv = stats[ly.name]
            mean = _stat(rm, ly.name, "running_mean", c, source)
            var = _stat(rv, ly.name, "running_var", c, source)
        identity = not np.any(a) and not np.any(b)
        if identity and ly.name not in stats:
            report.kept.append(ly.name)
            continue
        x_type = _x_type(index, node, params)
        stats_type = TensorProto.DOUBLE if x_type == TensorProto.DOUBLE else TensorProto.FLOAT
        b_ = Builder(ly.name + "/bncorrect", opset, taken, shared, stats_type)
        if identity:  # recalibration only: stay a plain (foldable) BN with the new statistics
            new = onnx.NodeProto()
            new.CopyFrom(node)
            ptype = helper.tensor_dtype_to_np_dtype(_np_elem_type(params["mean"]))
            new.input[3] = b_.const("running_mean", mean, ptype)
            new.input[4] = b_.const("running_var", var, ptype)
            if as_constants:
                replacements[ly.node_index] = [*_constant_nodes(b_, b_.inits), new]
            else:
                replacements[ly.node_index] = [new]
                new_inits += b_.inits
            dropped_params |= {node.input[3], node.input[4]}
            report.recalibrated.append(ly.name)
            continue
        plan = LayerPlan(
            name=ly.name,
            x=node.input[0],
            y=node.output[0],
            rank=ly.rank,
            x_type=x_type,
            stats_type=stats_type,
            eps=ly.eps,
            gamma=params["scale"].astype(np.float64),
            bias=params["bias"].astype(np.float64),
            mean=mean,
            var=var,
            alpha=a,
            beta=b,
            shape=index.dims(node.input[0]),
        )
        build(b_, plan)
        if as_constants:
            replacements[ly.node_index] = _constant_nodes(b_, b_.shared_inits + b_.inits) + b_.nodes
        else:
            replacements[ly.node_index] = b_.nodes
            new_inits += b_.shared_inits + b_.inits
        dropped_params |= set(node.input[1:5])
        report.rewritten.append(ly.name)
    if not replacements:
        return out, report
    nodes = []
    for i, node in enumerate(g.node):
        nodes.extend(replacements.get(i, [node]))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    _prune(out, dropped_params)
    _record(out, report)
    if check:
        problem = checker_error(out)
        if problem is not None:
            if checker_error(model) is None:
                raise OnnxError(
                    f"the rewritten graph does not pass onnx.checker: {problem}",
                    path=source,
                    hint="this is a bncorrect bug; please report it with the model's opset and BN layer "
                    "shapes",
                )
            report.notes.append(f"the input graph itself does not pass onnx.checker ({problem})")
    return out, report


def _constant_nodes(b: Builder, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """``inits`` as Constant nodes (for IR < 4 graphs, whose initializers must all be graph inputs)."""
    nodes = []
    for t in inits:
        node = helper.make_node("Constant", [], [t.name], name=b.fresh("const_node"), value=t)
        node.doc_string = f"{MARK} corrected BatchNormalization (DESIGN §2), part of {b.prefix}"
        nodes.append(node)
    return nodes


def _prune(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the rewritten nodes' parameter initializers / Constant / Identity nodes no longer used, and the
    graph inputs that name removed initializers (every initializer is one in IR < 4 graphs; in later IR
    versions such an input is an overridable default): a caller feeding one would be silently ignored."""
    g = model.graph
    init_names = {t.name for t in g.initializer}

    def kept_io() -> set[str]:
        inputs = {v.name for v in g.input if v.name not in init_names or v.name not in names}
        return inputs | {v.name for v in g.output}

    while True:
        used = {i for n in g.node for i in n.input} | kept_io()
        dead = [
            k
            for k, n in enumerate(g.node)
            if not _is_ours(n)
            and n.op_type in ("Constant", "Identity")
            and n.output[0] in names
            and n.output[0] not in used
        ]
        if not dead:
            break
        for k in reversed(dead):
            names |= set(g.node[k].input)
            del g.node[k]
    used = {i for n in g.node for i in n.input} | kept_io()
    kept = [t for t in g.initializer if t.name not in names or t.name in used]
    if len(kept) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept)
    gone = names - used
    vi = [v for v in g.value_info if v.name not in gone]
    if len(vi) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(vi)
    removed = (init_names - {t.name for t in g.initializer}) & gone
    inputs = [v for v in g.input if v.name not in removed]
    if len(inputs) != len(g.input):
        del g.input[:]
        g.input.extend(inputs)


def _record(model: onnx.ModelProto, report: RewriteReport) -> None:
    """Note in the model's metadata what bncorrect rewrote (appending to an earlier entry)."""
    from . import __version__

    entry: dict[str, Any] = {
        "version": __version__,
        "formulation": report.formulation,
        "rewritten": [],
        "recalibrated": [],
    }
    for p in model.metadata_props:
        if p.key == META_KEY:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                old = json.loads(p.value)
                entry["rewritten"] += list(old.get("rewritten", []))
                entry["recalibrated"] += list(old.get("recalibrated", []))
    entry["rewritten"] += report.rewritten
    entry["recalibrated"] += report.recalibrated
    props = [p for p in model.metadata_props if p.key != META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=META_KEY, value=json.dumps(entry))


def checker_error(model: onnx.ModelProto) -> str | None:
    """What ``onnx.checker.check_model(full_check=True)`` objects to (None when it passes); models above
    2 GB are checked through a temporary external-data copy."""
    try:
        if _model_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "model.onnx"
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
                onnx.save_model(copy, str(p), save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(p), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return str(e).strip()
    return None

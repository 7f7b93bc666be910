r"""Estimate, recalibrate and sweep directly on an ONNX graph, run by onnxruntime (for users who have only
the graph; DESIGN §3, issue #5 point 4).

The math is not repeated here: the graph only produces each BN layer's input ``x`` for the data, and the
same classes and functions as the PyTorch path consume it (:class:`~bncorrect.estimation.EvalNormEstimator`,
:class:`~bncorrect.recalibration.PopulationMoments`, :func:`bncorrect.correction.example_stats` /
:func:`~bncorrect.correction.group_stats`, the sweep's tally and report). Every derived graph is built with
the pattern -> check -> build rewrite of :mod:`bncorrect.onnx_rewrite`, so the same BN nodes qualify.

**Training-mode graph** (``estimate``, ``recalibrate --upstream train``). Each correctable BN node becomes
normalization over consecutive groups of B examples (its own B, ``--layer-batch-size``), exactly the
training-mode layer of DESIGN §3 with biased variances and the node's eps::

    x3      = Reshape(x, (N, C, L))                                   rank 2: L = 1, so var_i = 0
    mu_i    = ReduceMean(x3, L);  var_i = ReduceMean((x3 - mu_i)^2, L)            two-pass, exact
    (G, B, C) groups:  mu_B = mean_g mu_i,  var_B = mean_g var_i + mean_g (mu_i - mu_B)^2   (total variance)
    s = gamma / sqrt(var_B + eps),  t = b - mu_B * s    expanded to (N, C, 1);   y = x3 * s + t  -> shape of x

and each BN node's input ``x`` is an extra graph output (a *tap*); nodes no tap needs are pruned (onnxruntime
runs every node of a session whatever outputs are asked for). Batches are cut to a multiple of the least
common multiple of the group sizes (the rest is dropped and counted, as in the PyTorch pass). For every
batch, in graph order, the observers get ``(x, mu_i, var_i, mu_B, var_B)`` with the statistics from
:mod:`bncorrect.correction`, as :func:`bncorrect.passes.training_mode_pass` gives them.

**Inference-consistent recalibration** (``--upstream eval``), by default the iterative scheme of
:mod:`bncorrect.recalibration` (:class:`~bncorrect.recalibration.OffsetNormalization`): one graph
(:func:`offset_graph`) in which every correctable BN node normalizes its input ``x`` with its batch moments
``m, v`` (per channel over examples and positions, two-pass ReduceMean in the statistics' type) turned into
mean ``w m + shift`` and variance ``ratio (v + eps) + q - eps`` by four graph inputs per node, and returns
``m``, ``v`` and the shape of ``x`` (N, C, L) as outputs (a few numbers per node: no activation leaves the
graph); one session, fed each batch's inputs in every pass. The graph is static, so the longest chain of BN
nodes (:func:`bn_depths`) is known and the iteration stops, exact, after depth + 1 passes at the latest.
With ``exact`` (the reference): layer by layer in graph (topological) order; for layer k the graph is the
original with the layers before it already recalibrated (plain BN with their new statistics, the
recalibration path of :func:`bncorrect.onnx_rewrite.rewrite`, so onnxruntime still folds them into their
Conv), pruned to layer k's input: one session per layer, each pass running only the prefix of the network
up to that layer. Measured against one session over the whole graph with every BN's statistics as graph
inputs, run once per layer (benchmarks/bench_onnx_passes.py, 256 examples, 2 threads): 0.52x its time on
the ResNet-style net (15 BN layers), 0.61x on the MobileNet-style net (13), sessions included (0.2 s for
all of them).

**Sweep**: one graph whose BN nodes read alpha, beta and the running statistics from graph inputs
(:func:`sweep_graph`: the corrected layer of DESIGN §2 in the formulation of
:func:`bncorrect.onnx_rewrite.build_fast`), one session fed each candidate's values in turn on every batch
while it is in memory; candidates are checked and laid out by the PyTorch sweep's own code. Measured
against one corrected graph per candidate (the graph ``rewrite`` writes, constants folded, EMA = the
original graph with BN folded into the Conv; one session each), 11 candidates, 256 examples, 2 threads
(benchmarks/bench_onnx_passes.py): the graph-input variant took 0.91x the time on the ResNet-style net and
0.92x on the MobileNet-style net, and built its session in 0.13-0.24 s against 1.3-1.5 s for the 11 graphs
(and holds the weights once, not 11 times).

Execution: onnxruntime's CPU provider (``device`` "cpu", or "auto" without CUDA), or its CUDA provider
when this onnxruntime has one ("cuda", "cuda:K", or "auto"); threads are onnxruntime's default unless
given. The graph must take one data input (its batch axis is made symbolic on the working copies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor

from . import correction as C
from . import distributed
from .corrections import Corrections
from .errors import DataError, NoBatchNormError, NumericalError, OnnxError, UsageError, shorten
from .estimation import (
    DEFAULT_POSITIONS,
    DEFAULT_SAMPLE_BUDGET,
    DEFAULT_SOLVE_ROWS,
    EstimateResult,
    check_batch_sizes,
    estimate_from_pass,
)
from .health import STATS_HINT, statistics_problem
from .layers import layer_batch_sizes
from .onnx_rewrite import (
    Builder,
    GraphIndex,
    LayerPlan,
    OnnxNormLayer,
    cast_in,
    example_stats_nodes,
    find_bn_nodes,
    finish_layer,
    match_layers,
    rewrite_with,
)
from .onnx_rewrite import require_bn_nodes as _require_bn_nodes
from .passes import (
    Batch,
    Observer,
    Progress,
    batch_size_of,
    check_observed,
    first_tensor,
    lcm,
    nonfinite_error,
    nonfinite_output_error,
    run_trimmed,
)
from .recalibration import (
    DEFAULT_MAX_PASSES,
    DEFAULT_TOLERANCE,
    OffsetNormalization,
    PopulationMoments,
    RecalibrateResult,
    Upstream,
    check_finite,
    check_iteration,
    check_upstream,
    merge_across_ranks,
    train_consistent_stats,
)
from .sweep import (
    DEFAULT_IGNORE_INDEX,
    BetaMode,
    Candidate,
    SegmentationTally,
    SweepResult,
    Tally,
    batch_labels,
    build_candidates,
    check_ignore_index,
    check_labels,
    check_masks,
    check_metric,
    ema_outputs_error,
    output_task,
    resolve_tables,
    select_logits,
    sweep_result,
    task_metric,
)

__all__ = [
    "GraphRunner",
    "OffsetInputs",
    "OnnxLayer",
    "SweepInputs",
    "bn_depths",
    "correctable_layers",
    "estimate_onnx",
    "node_corrections",
    "offset_graph",
    "providers_for",
    "recalibrate_onnx",
    "sweep_graph",
    "sweep_onnx",
    "tap_graph",
    "tap_name",
    "training_graph",
    "training_pass",
]

_ORT_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


# ---------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class OnnxLayer:
    """A correctable BN node: its name, input tensor, channels, eps, running statistics (float64) and
    output tensor."""

    name: str
    x: str
    channels: int
    eps: float
    running_mean: Tensor
    running_var: Tensor
    y: str = ""


def correctable_layers(model: onnx.ModelProto, *, source: str | Path | None = None) -> list[OnnxLayer]:
    """Every correctable BN node in graph order; :class:`NoBatchNormError` (with the folded-BN explanation)
    when there is none. Nodes whose only problem is their stored statistics (``stats_problem``: NaN, Inf,
    negative variance) are included, as :func:`bncorrect.layers.correct_model` wraps such layers: the
    passes observe their inputs (recalibration replaces their statistics) and raise
    :class:`NumericalError` where the broken statistics would be used."""
    found = _require_bn_nodes(model, source=source)
    ok = [
        ly
        for ly in found
        if ly.correctable or (ly.stats_problem is not None and ly.reason == ly.stats_problem)
    ]
    if not ok:
        reasons = "; ".join(f"{ly.name}: {ly.reason}" for ly in found[:5])
        raise NoBatchNormError(f"no BatchNorm layer can be corrected ({reasons})", path=source)
    stats = _running_stats(model, ok)
    return [
        OnnxLayer(
            ly.name,
            model.graph.node[ly.node_index].input[0],
            ly.channels,
            ly.eps,
            *stats[ly.name],
            y=model.graph.node[ly.node_index].output[0],
        )
        for ly in ok
    ]


def _running_stats(
    model: onnx.ModelProto, layers: Sequence[OnnxNormLayer]
) -> dict[str, tuple[Tensor, Tensor]]:
    index = GraphIndex(model)  # parameters resolved the way the rewrite resolves them
    out = {}
    for ly in layers:
        values = [index.resolve(ly.param_names[k], k)[0] for k in ("mean", "var")]
        mean, var = (torch.from_numpy(np.asarray(v, dtype=np.float64).copy()) for v in values)
        out[ly.name] = (mean, var)
    return out


def node_corrections(
    model: onnx.ModelProto, corrections: Corrections, *, source: str | Path | None = None
) -> Corrections:
    """``corrections`` with its layers renamed to BN node names (PyTorch module paths are matched by the
    BN parameter names, :func:`bncorrect.onnx_rewrite.match_layers`)."""
    mapping = match_layers(model, list(corrections.layers), source=source)
    return Corrections(
        {mapping[n]: lc for n, lc in corrections.layers.items()},
        corrections.method,
        corrections.train_batch_size,
        corrections.model_sha256,
        corrections.data,
        corrections.metrics,
    )


# ---------------------------------------------------------------------------------------------- graphs
def _group_norm_builder(sizes: Mapping[str, int]) -> Callable[[Builder, LayerPlan], None]:
    """Build function for :func:`bncorrect.onnx_rewrite.rewrite_with`: training-mode normalization over
    consecutive groups of ``sizes[name]`` examples (module docstring)."""

    def build(b: Builder, p: LayerPlan) -> None:
        c = p.channels
        x3 = b.op("Reshape", [cast_in(b, p), b.shape([0, 0, -1])], "x_ncl")
        mu = b.reduce("ReduceMean", x3, [2], 1, "mu_i")
        xc = b.op("Sub", [x3, mu], "x_centered")
        var = b.reduce("ReduceMean", b.op("Mul", [xc, xc], "x_centered_sq"), [2], 1, "var_i")
        groups = b.shape([-1, int(sizes[p.name]), c])
        mu_g = b.op("Reshape", [mu, groups], "mu_i_groups")
        var_g = b.op("Reshape", [var, groups], "var_i_groups")
        mu_b = b.reduce("ReduceMean", mu_g, [1], 1, "mu_b")
        dm = b.op("Sub", [mu_g, mu_b], "mu_i_dev")
        var_b = b.op(
            "Add",
            [
                b.reduce("ReduceMean", var_g, [1], 1, "mean_var_i"),
                b.reduce("ReduceMean", b.op("Mul", [dm, dm], "mu_i_dev_sq"), [1], 1, "var_mu_i"),
            ],
            "var_b",
        )
        std = b.op("Sqrt", [b.op("Add", [var_b, b.const("eps", p.eps)], "var_b_eps")], "std_b")
        s = b.op("Div", [b.const("gamma", p.gamma.reshape(1, 1, c)), std], "scale")
        t = b.op("Sub", [b.const("bias", p.bias.reshape(1, 1, c)), b.op("Mul", [mu_b, s], "mu_s")], "shift")
        full = b.op("Shape", [mu_g], "groups_shape")
        per_row = b.shape([-1, c, 1])
        s_n = b.op("Reshape", [b.op("Expand", [s, full], "scale_rows"), per_row], "scale_n")
        t_n = b.op("Reshape", [b.op("Expand", [t, full], "shift_rows"), per_row], "shift_n")
        y3 = b.op("Add", [b.op("Mul", [x3, s_n], "x_s"), t_n], "y_ncl")
        finish_layer(b, p, "y", "Reshape", [y3, b.op("Shape", [p.x], "x_shape")])

    return build


def training_graph(
    model: onnx.ModelProto, group_sizes: Mapping[str, int], *, source: str | Path | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` with every BN node named in ``group_sizes`` in training-mode normalization over
    consecutive groups of that many examples (module docstring). Batches fed to it must hold a multiple of
    each group size."""
    return _build_every(
        model,
        group_sizes,
        _group_norm_builder(group_sizes),
        "training-mode normalization over groups of B (bncorrect.onnx_passes)",
        "put in training mode",
        source,
    )


def _build_every(
    model: onnx.ModelProto,
    names: Iterable[str],
    build: Callable[[Builder, LayerPlan], None],
    formulation: str,
    what: str,
    source: str | Path | None,
) -> onnx.ModelProto:
    """:func:`bncorrect.onnx_rewrite.rewrite_with` with ``build`` on every BN node of ``names``, without the
    ``onnx.checker`` pass; :class:`OnnxError` listing the nodes that cannot be ``what``."""
    ones = dict.fromkeys(names, 1.0)  # any non-zero coefficient: the rewrite builds every named node
    out, report = rewrite_with(
        model, ones, ones, source=source, build=build, formulation=formulation, check=False
    )
    if report.skipped:
        raise OnnxError(
            f"some BN nodes cannot be {what}: " + "; ".join(f"{n}: {r}" for n, r in report.skipped),
            path=source,
        )
    return out


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node's subgraphs (If/Loop/Scan bodies) read, outer-scope ones included."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names |= set(n.input) | _subgraph_names(n)
    return names


def tap_graph(model: onnx.ModelProto, taps: Sequence[str], *, keep_outputs: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are the tensors ``taps`` (plus the original outputs with
    ``keep_outputs``), every node and initializer none of them needs left out. A tap that is a graph input
    is passed through an Identity node (:func:`tap_name` gives the output's name)."""
    g = model.graph
    inputs = {v.name for v in g.input}
    outputs = list(g.output) if keep_outputs else []
    names = {o.name for o in outputs}
    nodes = list(g.node)
    for t in dict.fromkeys(taps):
        name = tap_name(model, t)
        if name != t:
            nodes.append(helper.make_node("Identity", [t], [name], name=f"{name}_node"))
        if name not in names:
            outputs.append(helper.make_empty_tensor_value_info(name))
            names.add(name)
    needed = set(names)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed |= set(node.input) | _subgraph_names(node)
    keep.reverse()
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    graph = out.graph
    _copy_fields(g, graph, skip=("node", "initializer", "value_info", "output", "input"))
    inits = {t.name for t in g.initializer}  # IR < 4 lists initializers among the inputs: drop those too
    graph.input.extend(v for v in g.input if v.name not in inits or v.name in needed)
    graph.node.extend(keep)
    graph.initializer.extend(t for t in g.initializer if t.name in needed)
    graph.value_info.extend(v for v in g.value_info if v.name in needed and v.name not in inputs)
    graph.output.extend(outputs)
    return out


def _copy_fields(src: Any, dst: Any, *, skip: Sequence[str]) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def tap_name(model: onnx.ModelProto, tensor: str) -> str:
    """The output name under which :func:`tap_graph` exposes ``tensor``."""
    return f"{tensor}/bncorrect_tap" if tensor in {v.name for v in model.graph.input} else tensor


def _data_input(model: onnx.ModelProto, source: str | Path | None) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    real = [v for v in model.graph.input if v.name not in inits]
    if len(real) != 1:
        raise OnnxError(
            f"the graph has {len(real)} inputs ({', '.join(v.name for v in real) or 'none'}); bncorrect "
            "feeds the data as its one input",
            path=source,
            hint="for models with several inputs use the Python API on the PyTorch model with a forward_fn",
        )
    return real[0]


def _fixed_batch(model: onnx.ModelProto, source: str | Path | None) -> int | None:
    """Make the data input's batch axis symbolic in ``model`` (in place); the fixed size it had, or None."""
    v = _data_input(model, source)
    dims = v.type.tensor_type.shape.dim if v.type.tensor_type.HasField("shape") else []
    if not dims or not dims[0].HasField("dim_value"):
        return None
    fixed = int(dims[0].dim_value)
    dims[0].dim_param = "bncorrect_batch"
    for o in model.graph.output:  # stale static batch sizes would contradict the new symbolic one
        od = o.type.tensor_type.shape.dim if o.type.tensor_type.HasField("shape") else []
        if od and od[0].HasField("dim_value") and int(od[0].dim_value) == fixed:
            od[0].dim_param = "bncorrect_batch"
    del model.graph.value_info[:]
    return fixed


# ---------------------------------------------------------------------------------------------- running
def providers_for(device: str | None) -> list[Any]:
    """onnxruntime execution providers for ``device``: "cpu"; "cuda" / "cuda:K" (needs onnxruntime's
    CUDAExecutionProvider); "auto"/None: CUDA when this onnxruntime has it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    d = "auto" if device is None else str(device).strip().lower()
    cpu = "CPUExecutionProvider"
    if d == "auto":
        return ["CUDAExecutionProvider", cpu] if "CUDAExecutionProvider" in available else [cpu]
    if d == "cpu":
        return [cpu]
    if d == "cuda" or d.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise UsageError(
                f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
                f"(it has {', '.join(available)})",
                hint="use --device cpu (or auto), or install onnxruntime-gpu",
            )
        idx = d.partition(":")[2] or "0"
        if not idx.isdigit():
            raise UsageError(f"--device {device}: expected cuda or cuda:K")
        return [("CUDAExecutionProvider", {"device_id": int(idx)}), cpu]
    raise UsageError(
        f"--device {device} is not available for ONNX models (onnxruntime)", hint="use cpu, cuda or auto"
    )


class GraphRunner:
    """One onnxruntime session over a graph with one data input, returning the asked-for outputs as CPU
    tensors. A batch that does not fit the graph raises :class:`DataError` naming the data."""

    def __init__(
        self,
        model: onnx.ModelProto,
        outputs: Sequence[str] | None = None,
        *,
        device: str | None = "auto",
        threads: int | None = None,
        source: str | Path | None = None,
        data_hint: str = "",
        fixed_batch: int | None = None,
        extra_inputs: Sequence[str] = (),
    ) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        self.source = source
        self.data_hint = data_hint
        self.fixed_batch = fixed_batch
        providers = providers_for(device)
        try:
            blob = model.SerializeToString()
        except ValueError:  # > 2 GB: onnxruntime reads it from a file with external data
            blob = None
        try:
            if blob is not None:
                self.session = ort.InferenceSession(blob, so, providers=providers)
            else:
                self.session = self._from_file(model, so, providers)
        except Exception as e:
            raise OnnxError(
                f"onnxruntime cannot load the graph ({_first_line(e)})",
                path=source,
                hint='check that the graph runs in onnxruntime (python -c "import onnxruntime as ort; '
                'ort.InferenceSession(PATH)")',
            ) from None
        inputs = [i for i in self.session.get_inputs() if i.name not in set(extra_inputs)]
        if len(inputs) != 1:
            raise OnnxError(
                f"the graph has {len(inputs)} inputs; bncorrect feeds the data as its one input", path=source
            )
        self.input = inputs[0]
        self.outputs = list(outputs) if outputs is not None else [o.name for o in self.session.get_outputs()]
        self.dtype = _ORT_NUMPY.get(self.input.type, np.float32)
        self._checked = False

    @staticmethod
    def _from_file(model: onnx.ModelProto, so: Any, providers: list[Any]) -> Any:
        import tempfile

        import onnxruntime as ort

        from .onnx_rewrite import save_onnx

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "graph.onnx"
            save_onnx(model, path, external_data=True, check_runtime=False)  # the session below is the check
            return ort.InferenceSession(str(path), so, providers=providers)

    def _check_shape(self, x: Tensor) -> None:
        want = list(self.input.shape or [])
        got = tuple(x.shape)
        fixed = [(i, d) for i, d in enumerate(want) if i > 0 and isinstance(d, int)]
        if len(want) != len(got) or any(got[i] != d for i, d in fixed):
            shown = tuple(d if isinstance(d, int) else "?" for d in want[1:])
            raise DataError(
                f"the data's examples have shape {got[1:]}, but the graph's input {self.input.name!r} takes "
                f"examples of shape {shown}",
                path=self.data_hint or None,
                hint="check that the data matches the model's expected input (channels, size, "
                "preprocessing: --resize/--crop/--channels/--mean/--std)",
            )

    def feed(self, x: Tensor) -> dict[str, np.ndarray]:
        """The data input's feed for one batch ``x`` (checked against the graph's input shape once)."""
        if not self._checked:
            self._check_shape(x)
            self._checked = True
        return {self.input.name: x.detach().cpu().numpy().astype(self.dtype, copy=False)}

    def run(
        self, x: Tensor | Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None
    ) -> list[Tensor]:
        """The outputs for one batch ``x`` (first axis: examples; or a :meth:`feed` already made), with
        ``extra`` graph inputs."""
        feed = dict(x) if isinstance(x, Mapping) else self.feed(x)
        if extra:
            feed.update(extra)
        try:
            values = self.session.run(self.outputs, feed)
        except Exception as e:
            hint = (
                "check that the data matches the model's expected input (channels, size, preprocessing: "
                "--resize/--crop/--channels/--mean/--std)"
            )
            if self.fixed_batch is not None:
                hint = (
                    f"the graph was exported with a fixed batch size of {self.fixed_batch}, and bncorrect "
                    "runs it on other batch sizes: re-export it with a dynamic batch axis "
                    "(torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes={'input': {0: 'batch'}}); "
                    "otherwise " + hint
                )
            shape = tuple(feed[self.input.name].shape)
            raise DataError(
                f"the ONNX model failed on a data batch of shape {shape}: {shorten(_first_line(e))}",
                path=self.data_hint or None,
                hint=hint,
            ) from None
        return [torch.from_numpy(np.asarray(v)) for v in values]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _working_copy(model: onnx.ModelProto, source: str | Path | None) -> tuple[onnx.ModelProto, int | None]:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work, _fixed_batch(work, source)


def _placeholder_statistics(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a working copy: changed in place) with the stored running statistics of every BN node
    whose statistics are broken (``stats_problem``) replaced by finite placeholders (mean 0, variance 1),
    where they are initializers. For the passes that never use them (training-mode normalization, the
    input taps of recalibration, layers already recalibrated), so that a checkpoint with NaN statistics
    can still be recalibrated; nothing computed from the placeholders is ever reported."""
    broken = [ly for ly in find_bn_nodes(model) if ly.stats_problem is not None]
    if not broken:
        return model
    inits = {t.name: k for k, t in enumerate(model.graph.initializer)}
    for ly in broken:
        for key, fill in (("mean", 0.0), ("var", 1.0)):
            name = ly.param_names.get(key)
            if name is not None and name in inits:
                tensor = model.graph.initializer[inits[name]]
                values = np.full_like(numpy_helper.to_array(tensor), fill)
                tensor.CopyFrom(numpy_helper.from_array(values, name))
    return model


def _input_tensor(batch: Batch) -> Tensor:
    x = first_tensor(batch)
    if x is None:
        raise DataError("a batch holds no tensor")
    return x


# ---------------------------------------------------------------------------------------------- passes
def training_pass(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    group_sizes: Mapping[str, int],
    observers: Mapping[str, Observer],
    *,
    device: str | None = "auto",
    threads: int | None = None,
    label: str,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
    source: str | Path | None = None,
) -> tuple[int, int]:
    """One pass over ``batches`` with the BN nodes of ``group_sizes`` in training-mode normalization over
    their group sizes; ``observers`` (by node name) see ``(x, mu_i, var_i, mu_b, var_b)`` per batch, in
    graph order. Returns (examples used, examples dropped); DataError when no whole group was seen;
    NumericalError naming the first layer (in graph order) whose input or statistics hold NaN/Inf. The
    ONNX counterpart of :func:`bncorrect.passes.training_mode_pass`."""
    work, fixed = _working_copy(model, source)
    layers = [ly for ly in correctable_layers(work, source=source) if ly.name in group_sizes]
    _placeholder_statistics(work)  # training-mode normalization never reads the stored statistics
    graph = training_graph(work, {ly.name: group_sizes[ly.name] for ly in layers}, source=source)
    graph = tap_graph(graph, [ly.x for ly in layers])
    runner = GraphRunner(
        graph,
        [tap_name(graph, ly.x) for ly in layers],
        device=device,
        threads=threads,
        source=source,
        data_hint=data_hint,
        fixed_batch=fixed,
    )

    def run(batch: Batch) -> None:
        data = _input_tensor(batch)
        values = runner.run(data)
        for ly, x in zip(layers, values, strict=True):  # graph order: the first layer at fault is named
            mu_i, var_i = C.example_stats(x)
            mu_b, var_b = C.group_stats(mu_i, var_i, group_sizes[ly.name])
            check_observed(ly.name, x, (mu_i, var_i, mu_b, var_b), data_hint=data_hint, data=data)
            observer = observers.get(ly.name)
            if observer is not None:
                observer(x, mu_i, var_i, mu_b, var_b)

    return run_trimmed(
        batches,
        lcm(group_sizes.values()),
        run,
        label=label,
        total_examples=total_examples,
        progress=progress,
        data_hint=data_hint,
    )


def estimate_onnx(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    train_batch_size: int,
    *,
    layer_batch_size: Mapping[str, int] | None = None,
    running_stats: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    device: str | None = "auto",
    threads: int | None = None,
    seed: int = 0,
    sample_budget: int = DEFAULT_SAMPLE_BUDGET,
    positions: int = DEFAULT_POSITIONS,
    solve_rows: int = DEFAULT_SOLVE_ROWS,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
    source: str | Path | None = None,
) -> EstimateResult:
    """Offline EvalNorm on an ONNX graph: every correctable BN node's (alpha, beta) over ``batches``, as
    :func:`bncorrect.estimation.estimate_alpha_beta` computes them for a PyTorch model (same estimator, same
    seeded sampling; layer names are node names, ``layer_batch_size`` globs match them).
    ``running_stats`` (node -> (mean, var)) replaces the graph's statistics, e.g. after recalibration."""
    check_batch_sizes(train_batch_size, layer_batch_size)
    layers = correctable_layers(model, source=source)
    sizes = layer_batch_sizes([ly.name for ly in layers], train_batch_size, layer_batch_size)
    stats = dict(running_stats or {})

    def run_pass(group_sizes: Mapping[str, int], observers: Mapping[str, Observer]) -> tuple[int, int]:
        return training_pass(
            model,
            batches,
            group_sizes,
            observers,
            device=device,
            threads=threads,
            label="estimate",
            total_examples=total_examples,
            progress=progress,
            data_hint=data_hint,
            source=source,
        )

    return estimate_from_pass(
        {ly.name: (*(stats.get(ly.name) or (ly.running_mean, ly.running_var)), ly.eps) for ly in layers},
        sizes,
        run_pass,
        train_batch_size,
        seed=seed,
        sample_budget=sample_budget,
        positions=positions,
        solve_rows=solve_rows,
        data_hint=data_hint,
        progress=progress,
    )


@dataclass(frozen=True)
class OffsetInputs:
    """One BN node of :func:`offset_graph`: the graph inputs it reads its normalization from (it normalizes
    its input of batch moments ``m, v`` with mean ``w m + shift`` and variance ``ratio (v + eps) + q - eps``,
    :class:`bncorrect.recalibration.OffsetNormalization`) and the graph outputs ``m``, ``v`` (shape (1, C, 1))
    and ``shape``, the (N, C, L) shape the moments are over."""

    w: str
    shift: str
    ratio: str
    q: str
    mean: str
    var: str
    shape: str
    channels: int
    dtype: Any  # numpy dtype of the inputs and moments

    @property
    def inputs(self) -> tuple[str, str, str, str]:
        return self.w, self.shift, self.ratio, self.q


def _offset_builder(specs: dict[str, OffsetInputs]) -> Callable[[Builder, LayerPlan], None]:
    """Build function for :func:`bncorrect.onnx_rewrite.rewrite_with`: the normalization of
    :func:`offset_graph` (module docstring)."""

    def build(b: Builder, p: LayerPlan) -> None:
        c = p.channels
        x3 = b.op("Reshape", [cast_in(b, p), b.shape([0, 0, -1])], "x_ncl")  # rank 2: L = 1
        m = b.reduce("ReduceMean", x3, [0, 2], 1, "batch_mean")
        xc = b.op("Sub", [x3, m], "x_centered")
        v = b.reduce("ReduceMean", b.op("Mul", [xc, xc], "x_centered_sq"), [0, 2], 1, "batch_var")
        w, shift, ratio, q = (b.fresh(k) for k in ("w", "shift", "ratio", "q"))
        mean = b.op("Add", [b.op("Mul", [m, w], "w_m"), shift], "norm_mean")
        v_eps = b.op("Add", [v, b.const("eps", p.eps)], "batch_var_eps")
        var_eps = b.op("Add", [b.op("Mul", [v_eps, ratio], "ratio_var"), q], "norm_var_eps")
        std = b.op("Sqrt", [var_eps], "norm_std")
        scale = b.op("Div", [b.const("gamma", p.gamma.reshape(1, c, 1)), std], "scale")
        centered = b.op("Sub", [x3, mean], "x_minus_mean")
        y3 = b.op(
            "Add",
            [b.op("Mul", [centered, scale], "x_scaled"), b.const("bias", p.bias.reshape(1, c, 1))],
            "y_ncl",
        )
        finish_layer(b, p, "y", "Reshape", [y3, b.op("Shape", [p.x], "x_shape")])
        specs[p.name] = OffsetInputs(
            w, shift, ratio, q, m, v, b.op("Shape", [x3], "ncl_shape"), c, b.np_dtype
        )

    return build


def offset_graph(
    model: onnx.ModelProto, layers: Sequence[OnnxLayer], *, source: str | Path | None = None
) -> tuple[onnx.ModelProto, dict[str, OffsetInputs]]:
    """A copy of ``model`` with every layer of ``layers`` normalizing as the iterative recalibration says
    (:class:`OffsetInputs` per node name: four graph inputs each), and only the layers' batch moments and
    shapes as outputs (nodes that none of them needs are left out)."""
    specs: dict[str, OffsetInputs] = {}
    graph = _build_every(
        model,
        [ly.name for ly in layers],
        _offset_builder(specs),
        "normalization with per-batch offsets from graph inputs (bncorrect.onnx_passes, recalibration)",
        "recalibrated",
        source,
    )
    elem = helper.np_dtype_to_tensor_dtype
    for spec in specs.values():
        dtype = elem(np.dtype(spec.dtype))
        graph.graph.input.append(helper.make_tensor_value_info(spec.w, dtype, [1, 1, 1]))
        for name in (spec.shift, spec.ratio, spec.q):
            graph.graph.input.append(helper.make_tensor_value_info(name, dtype, [1, spec.channels, 1]))
    taps = [t for ly in layers for t in (specs[ly.name].mean, specs[ly.name].var, specs[ly.name].shape)]
    return tap_graph(graph, taps), specs


def bn_depths(model: onnx.ModelProto, layers: Sequence[OnnxLayer]) -> dict[str, int]:
    """Per layer of ``layers`` (node name): the number of layers on the longest chain of them upstream of
    it, through the graph's dataflow (subgraphs' outer-scope reads included). The iterative recalibration
    is exact after max + 1 passes."""
    by_output = {ly.y: ly.name for ly in layers if ly.y}
    depth: dict[str, int] = {}  # tensor -> longest chain of layers upstream of it (their outputs included)
    out: dict[str, int] = {}
    for node in model.graph.node:
        d = max((depth.get(t, 0) for t in [*node.input, *_subgraph_names(node)] if t), default=0)
        name = by_output.get(node.output[0]) if node.output else None
        if name is not None:
            out[name] = depth.get(node.input[0], 0)
            d = max(d, out[name] + 1)  # its output depends on its own statistics too
        for o in node.output:
            depth[o] = d
    return out


def _feed(value: Tensor | float, shape: Sequence[int], dtype: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy().astype(dtype).reshape(shape)
    return np.full(shape, value, dtype=dtype)


def recalibrate_onnx(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    *,
    upstream: Upstream = "eval",
    batch_size: int | None = None,
    exact: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    max_passes: int = DEFAULT_MAX_PASSES,
    device: str | None = "auto",
    threads: int | None = None,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
    source: str | Path | None = None,
) -> RecalibrateResult:
    """Population statistics of every correctable BN node over ``batches``, as
    :func:`bncorrect.recalibration.recalibrate_stats` computes them for a PyTorch model: ``eval`` with the
    iterative scheme (at most ``max_passes`` and at most depth + 1 passes, module docstring; ``batches``
    re-iterable, in the same order each time) or with ``exact`` layer by layer with the earlier layers
    recalibrated, ``train`` from one training-mode pass over groups of ``batch_size``."""
    layers = correctable_layers(model, source=source)
    if upstream == "train":

        def run_pass(group_sizes: Mapping[str, int], observers: Mapping[str, Observer]) -> tuple[int, int]:
            return training_pass(
                model,
                batches,
                group_sizes,
                observers,
                device=device,
                threads=threads,
                label="recalibrate",
                total_examples=total_examples,
                progress=progress,
                data_hint=data_hint,
                source=source,
            )

        return train_consistent_stats(
            {ly.name: ly.channels for ly in layers}, batch_size, run_pass, data_hint=data_hint
        )
    check_upstream(upstream, batches)
    work, fixed = _working_copy(model, source)
    # the recalibrated layers never read their stored statistics (broken ones become placeholders)
    _placeholder_statistics(work)
    if exact:
        return _layer_by_layer(
            work, fixed, layers, batches, device, threads, total_examples, progress, data_hint, source
        )
    check_iteration(tolerance, max_passes)
    depths = bn_depths(work, layers)
    bound = max(depths.values(), default=0) + 1  # passes after which the statistics are exact
    cap = min(max_passes, bound)
    graph, specs = offset_graph(work, layers, source=source)
    outputs = [t for ly in layers for t in (specs[ly.name].mean, specs[ly.name].var, specs[ly.name].shape)]
    runner = GraphRunner(
        graph,
        outputs,
        device=device,
        threads=threads,
        source=source,
        data_hint=data_hint,
        fixed_batch=fixed,
        extra_inputs=[n for spec in specs.values() for n in spec.inputs],
    )
    state = OffsetNormalization(
        {ly.name: ly.eps for ly in layers}, tolerance=tolerance, max_passes=cap, data_hint=data_hint
    )
    done = False
    while not done:
        state.begin_pass()
        label = f"recalibrate pass {state.passes} of ≤{cap}"

        def one_pass(label: str = label) -> None:
            for batch in batches:
                data = _input_tensor(batch)
                state.begin_batch(data, batch_size_of(batch))
                feed = runner.feed(data)
                extra = {}
                for ly in layers:
                    spec = specs[ly.name]
                    shapes = ((1, 1, 1), *((1, spec.channels, 1),) * 3)
                    for name, value, shape in zip(
                        spec.inputs, state.coefficients(ly.name), shapes, strict=True
                    ):
                        extra[name] = _feed(value, shape, spec.dtype)
                values = runner.run(feed, extra)
                for k, ly in enumerate(layers):  # graph order: the first layer at fault is named
                    mean, var, shape = values[3 * k : 3 * k + 3]
                    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
                        raise _nonfinite_input(graph, ly, {**feed, **extra}, runner, device, threads, data)
                    n = int(shape[0]) * int(shape[2])
                    state.record_moments(ly.name, mean.reshape(-1), var.reshape(-1), n)
                if progress is not None:
                    progress(label, state.examples, total_examples)

        distributed.guarded(one_pass)  # a failure on any rank is raised on every rank
        done = state.end_pass()
    return state.result([ly.name for ly in layers], exact=state.passes >= bound)


def _nonfinite_input(
    graph: onnx.ModelProto,
    ly: OnnxLayer,
    feed: Mapping[str, np.ndarray],
    runner: GraphRunner,
    device: str | None,
    threads: int | None,
    data: Tensor,
) -> NumericalError:
    """The error for layer ``ly`` whose batch moments in :func:`offset_graph` ``graph`` are NaN/Inf: the
    batch (``feed``: every input) is run again with the layer's input as the output, to say what is wrong
    with it (NaN/Inf, or finite values whose variance overflows the statistics' type)."""
    tapped = tap_graph(graph, [ly.x])
    again = GraphRunner(
        tapped,
        [tap_name(graph, ly.x)],
        device=device,
        threads=threads,
        source=runner.source,
        data_hint=runner.data_hint,
        extra_inputs=[n for n in feed if n != runner.input.name],
    )
    (x,) = again.run(dict(feed))
    return nonfinite_error(ly.name, x, data_hint=runner.data_hint, data=data)


def _layer_by_layer(
    work: onnx.ModelProto,
    fixed: int | None,
    layers: Sequence[OnnxLayer],
    batches: Iterable[Batch],
    device: str | None,
    threads: int | None,
    total_examples: int | None,
    progress: Progress | None,
    data_hint: str,
    source: str | Path | None,
) -> RecalibrateResult:
    """The exact scheme: layer k's pass reads the layers before it with their new statistics and stops at
    its own input (module docstring)."""
    done: dict[str, tuple[Tensor, Tensor]] = {}
    examples = seen = 0
    label = f"recalibrate layer by layer ({len(layers)} layers)"
    total = None if total_examples is None else total_examples * len(layers)
    for ly in layers:
        graph = (
            rewrite_with(work, {}, {}, running_stats=done, source=source, check=False)[0] if done else work
        )
        graph = tap_graph(graph, [ly.x])
        runner = GraphRunner(
            graph,
            [tap_name(graph, ly.x)],
            device=device,
            threads=threads,
            source=source,
            data_hint=data_hint,
            fixed_batch=fixed,
        )
        moments = PopulationMoments(ly.channels, name=ly.name, data_hint=data_hint)

        def layer_pass(
            runner: GraphRunner = runner, moments: PopulationMoments = moments, seen: int = seen
        ) -> int:
            count = 0
            for batch in batches:
                data = _input_tensor(batch)
                (x,) = runner.run(data)
                moments.add(x, data)
                count += batch_size_of(batch)
                if progress is not None:
                    progress(label, seen + count, total)
            return count

        examples = distributed.guarded(layer_pass)
        if distributed.active():  # the moments and counts of every rank
            merged = {ly.name: moments}
            merge_across_ranks(merged)
            moments = merged[ly.name]
            (examples,) = distributed.sum_ints(examples)
        if examples == 0:
            raise DataError(
                "the data is empty", path=data_hint or None, hint="pass a dataset with at least one example"
            )
        seen += examples
        mean, var = moments.mean, moments.variance()
        check_finite(ly.name, mean, var, data_hint=data_hint)
        done[ly.name] = (mean.float(), var.float())
    return RecalibrateResult(
        dict(done), "eval", examples, len(layers), None, [], "layer by layer", 0.0, None, True, True
    )


# ---------------------------------------------------------------------------------------------- sweep
@dataclass(frozen=True)
class SweepInputs:
    """The graph inputs one BN node of the sweep graph reads its coefficients and statistics from."""

    alpha: str
    beta: str
    mean: str
    var: str
    shape: tuple[int, ...]  # (C, 1, ...): broadcasts against the layer's (N, C, *spatial) statistics
    dtype: Any  # numpy dtype of the statistics
    check: str = ""  # an extra graph output: float64 sum of mu_hat and var_hat, NaN/Inf exactly when they are


def _sweep_builder(specs: dict[str, SweepInputs]) -> Callable[[Builder, LayerPlan], None]:
    """Build function for :func:`bncorrect.onnx_rewrite.rewrite_with`: the corrected layer of DESIGN §2 with
    alpha, beta, mu_E and var_E read from graph inputs; statistics and the final per-(N, C) affine step as
    in :func:`bncorrect.onnx_rewrite.build_fast` (exact two-pass statistics below opset 17)."""

    def build(b: Builder, p: LayerPlan) -> None:
        x = cast_in(b, p)
        if p.rank is None or p.rank < 3:  # (N, C) and unknown ranks as (N, C, L): var_i = 0 when L = 1
            x = b.op("Reshape", [x, b.shape([0, 0, -1])], "x_ncl")
            r = 3
        else:
            r = p.rank
        a_in, b_in, m_in, v_in = (b.fresh(k) for k in ("alpha", "beta", "running_mean", "running_var"))
        mu, v, is_inv_std = example_stats_nodes(b, replace(p, beta=np.ones(())), x, r)
        var_i = b.op("Reciprocal", [b.op("Mul", [v, v], "inv_var")], "var_i") if is_inv_std else v
        d = b.op("Sub", [mu, m_in], "d")
        mu_hat = b.op("Add", [m_in, b.op("Mul", [d, a_in], "alpha_d")], "mu_hat")
        one_m_beta = b.op("Sub", [b.const("one", 1.0), b_in], "one_m_beta")
        var_hat = b.op(
            "Sum",
            [
                b.op("Mul", [var_i, b_in], "beta_var_i"),
                b.op("Mul", [v_in, one_m_beta], "var_e_term"),
                b.op("Mul", [b.op("Mul", [d, d], "d2"), b.op("Mul", [b_in, one_m_beta], "bb")], "bb_d2"),
            ],
            "var_hat",
        )
        # NaN/Inf in x, its statistics (var_i overflow included: beta * Inf is NaN for beta = 0) or the
        # running statistics reach mu_hat or var_hat; summed in float64, which no float32 value overflows
        double = onnx.TensorProto.DOUBLE
        axes = list(range(r))
        sums = [
            b.reduce("ReduceSum", b.op("Cast", [t], f"{label}_f64", to=double), axes, 0, label)
            for t, label in ((mu_hat, "mu_hat_sum"), (var_hat, "var_hat_sum"))
        ]
        check = b.op("Add", sums, "nonfinite_check")
        specs[p.name] = SweepInputs(a_in, b_in, m_in, v_in, (p.channels,) + (1,) * (r - 2), b.np_dtype, check)
        flat = b.shape([-1])
        n = b.batch_size(x, p.batch_dim)
        g_in = b.op("Tile", [b.const("gamma", p.gamma), n], "gamma_tiled")
        bias_in = b.op("Tile", [b.const("bias", p.bias), n], "bias_tiled")
        mv = b.op("Reshape", [mu_hat, flat], "mu_hat_flat")
        vv = b.op("Reshape", [var_hat, flat], "var_hat_flat")
        xv = b.op("Reshape", [x, b.shape([1, -1] + [0] * (r - 2))], "x_view")
        yv = b.op("BatchNormalization", [xv, g_in, bias_in, mv, vv], "y_view", epsilon=float(p.eps))
        finish_layer(b, p, "y", "Reshape", [yv, b.op("Shape", [p.x], "x_shape")])

    return build


def sweep_graph(
    model: onnx.ModelProto, layers: Sequence[OnnxLayer], *, source: str | Path | None = None
) -> tuple[onnx.ModelProto, dict[str, SweepInputs]]:
    """A copy of ``model`` with every layer of ``layers`` corrected with alpha, beta and running statistics
    read from graph inputs (:class:`SweepInputs` per node name): one session serves every candidate. After
    the model's outputs come one scalar output per layer (``SweepInputs.check``), NaN/Inf exactly when that
    layer's statistics are."""
    specs: dict[str, SweepInputs] = {}
    graph = _build_every(
        model,
        [ly.name for ly in layers],
        _sweep_builder(specs),
        "corrected layer with alpha, beta and statistics as graph inputs (bncorrect.onnx_passes)",
        "corrected",
        source,
    )
    elem = helper.np_dtype_to_tensor_dtype
    for spec in specs.values():
        for name in (spec.alpha, spec.beta, spec.mean, spec.var):
            graph.graph.input.append(
                helper.make_tensor_value_info(name, elem(np.dtype(spec.dtype)), spec.shape)
            )
        graph.graph.output.append(helper.make_tensor_value_info(spec.check, onnx.TensorProto.DOUBLE, []))
    return graph, specs


def _candidate_feeds(
    candidates: Sequence[Candidate], layers: Sequence[OnnxLayer], specs: Mapping[str, SweepInputs]
) -> list[dict[str, np.ndarray]]:
    """Per candidate, the feed of every layer's alpha/beta/statistics inputs. Candidates are checked and
    laid out by the PyTorch sweep's own code (:func:`bncorrect.sweep.resolve_tables`: same defaults,
    same errors), given each node's channels and running statistics."""
    from types import SimpleNamespace

    def stats(ly: OnnxLayer) -> SimpleNamespace:  # float64 statistics keep the tables in float64
        double = np.dtype(specs[ly.name].dtype) == np.float64
        mean, var = (t if double else t.float() for t in (ly.running_mean, ly.running_var))
        return SimpleNamespace(running_mean=mean, running_var=var)

    views = {ly.name: SimpleNamespace(num_channels=ly.channels, norm=stats(ly)) for ly in layers}
    tables = resolve_tables(candidates, views)  # type: ignore[arg-type]
    feeds: list[dict[str, np.ndarray]] = [{} for _ in candidates]
    for ly in layers:
        spec, tab = specs[ly.name], tables[ly.name]
        for k, feed in enumerate(feeds):
            mean = ly.running_mean if tab.running_mean is None else tab.running_mean[k]
            var = ly.running_var if tab.running_var is None else tab.running_var[k]
            for name, value in (
                (spec.alpha, tab.alpha[k]),
                (spec.beta, tab.beta[k]),
                (spec.mean, mean),
                (spec.var, var),
            ):
                feed[name] = value.detach().cpu().numpy().astype(spec.dtype).reshape(spec.shape)
    return feeds


def _outputs(values: list[Tensor], names: list[str]) -> Any:
    return values[0] if len(values) == 1 else dict(zip(names, values, strict=True))


def _explain_ema(
    model: onnx.ModelProto,
    layers: Sequence[OnnxLayer],
    data: Tensor,
    device: str | None,
    threads: int | None,
    source: str | Path | None,
    data_hint: str,
    fixed: int | None,
) -> Exception:
    """The error for plain BN (the graph as it is, EMA) meeting NaN/Inf on the batch ``data``: the graph is
    run once with every BN node's input and output as outputs, and the first node (in graph order) whose
    input is NaN/Inf or too large for its statistics, or whose output is NaN/Inf from a fine input, is
    named; otherwise the non-finite values arise outside the BN nodes."""
    taps = [t for ly in layers for t in (ly.x, ly.y) if t]
    graph = tap_graph(model, taps)
    runner = GraphRunner(
        graph,
        [tap_name(graph, t) for t in taps],
        device=device,
        threads=threads,
        source=source,
        data_hint=data_hint,
        fixed_batch=fixed,
    )
    values = dict(zip(taps, runner.run(data), strict=True))
    for ly in layers:
        x = values[ly.x]
        try:
            check_observed(ly.name, x, C.example_stats(x), data_hint=data_hint, data=data)
        except NumericalError as e:
            return e
        out = values.get(ly.y)
        if out is not None and not bool(torch.isfinite(out).all()):
            broken = statistics_problem(ly.running_mean, ly.running_var)
            return nonfinite_output_error(ly.name, out, broken, data_hint=data_hint, owner="graph")
    return ema_outputs_error(data_hint)


def sweep_onnx(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    alphas: Sequence[float] | None = None,
    *,
    beta_mode: BetaMode = "equal",
    train_batch_size: int | None = None,
    extra_candidates: Sequence[Candidate] = (),
    metric: str = "nll",
    output_key: str | int | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    device: str | None = "auto",
    threads: int | None = None,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
    source: str | Path | None = None,
) -> SweepResult:
    """:func:`bncorrect.sweep.sweep_alpha` for an ONNX graph: every candidate (EMA, the grid, the rule
    1/B^2, ``extra_candidates`` keyed by node name) evaluated on labelled ``batches`` (iterated once) with
    its own corrected graph; nll (log-softmax in float64), top1 and top5 tallied as in the PyTorch sweep.
    Returns a :class:`~bncorrect.sweep.SweepResult`; ``output_key`` picks the logits among several graph
    outputs (index or output name). Non-finite values follow the PyTorch sweep's rules: NaN/Inf with plain
    BN (the EMA row; BN nodes with broken stored statistics included) is a :class:`NumericalError` naming
    the first BN node at fault; a corrected row that alone meets NaN/Inf is marked and never chosen.

    Segmentation as in the PyTorch sweep: a graph output (N, K, H, W) of per-pixel logits (``output_key``
    picks it among several) with masks ``y`` (N, H, W) gives pixel-nll, miou and pixel-acc over the pixels
    whose mask value is not ``ignore_index``; each candidate's maps are tallied as soon as they are computed
    (never all K at once)."""
    metric = check_metric(metric)
    ignore_index = check_ignore_index(ignore_index)
    candidates = build_candidates(
        alphas, beta_mode=beta_mode, train_batch_size=train_batch_size, extra=extra_candidates
    )
    work, fixed = _working_copy(model, source)
    layers = correctable_layers(work, source=source)
    for node in find_bn_nodes(work):
        if node.stats_problem is not None:  # plain BN (the EMA row) would be NaN or meaningless
            raise NumericalError(
                f"BN node {node.name} cannot be swept: {node.stats_problem}",
                path=source,
                hint=STATS_HINT,
            )
    graph, specs = sweep_graph(work, layers, source=source)
    feeds = _candidate_feeds(candidates, layers, specs)
    extra = [n for spec in specs.values() for n in (spec.alpha, spec.beta, spec.mean, spec.var)]
    checks = [spec.check for spec in specs.values()]
    names = [o.name for o in graph.graph.output if o.name not in set(checks)]
    runner = GraphRunner(
        graph,
        names + checks,
        device=device,
        threads=threads,
        source=source,
        data_hint=data_hint,
        fixed_batch=fixed,
        extra_inputs=extra,
    )
    tally: Tally | SegmentationTally = Tally(len(candidates))
    num_classes = top_k = 0
    out_shape: tuple[int, ...] = ()
    failure: Exception | None = None  # under a process group: raised on every rank after the loop
    try:
        for batch in batches:
            rows = batch_size_of(batch)
            if rows == 0:
                continue
            y = batch_labels(batch, rows, data_hint)
            data = _input_tensor(batch)
            x = runner.feed(data)
            outs, bad = [], []
            for k, f in enumerate(feeds):
                values = runner.run(x, f)
                out = select_logits(_outputs(values[: len(names)], names), output_key, rows)
                bad.append(
                    not all(bool(torch.isfinite(v).all()) for v in values[len(names) :])
                    or not bool(torch.isfinite(out).all())
                )
                if k == 0:
                    if bad[0]:  # plain BN itself meets NaN/Inf: the model or the data is broken
                        raise _explain_ema(work, layers, data, device, threads, source, data_hint, fixed)
                    if top_k == 0:
                        out_shape = tuple(out.shape)
                        if output_task(out_shape, y, data_hint, output_key) == "segmentation":
                            metric = task_metric(metric, "segmentation")
                            num_classes, top_k = int(out.shape[1]), 1
                            tally = SegmentationTally(
                                len(candidates), num_classes, ignore_index, data_hint, output_key
                            )
                        else:
                            metric = task_metric(metric, "classification")
                            num_classes = int(out.shape[-1])
                            top_k = min(5, num_classes)
                    if isinstance(tally, SegmentationTally):
                        if y.dim() != 3:
                            output_task((rows, *out_shape[1:]), y, data_hint, output_key)  # raises
                        check_masks(y, num_classes, ignore_index, data_hint, output_key)
                    else:
                        if y.dim() != 1:
                            output_task((rows, *out_shape[1:]), y, data_hint, output_key)  # raises
                        check_labels(y, num_classes, data_hint, output_key)
                if isinstance(tally, SegmentationTally):  # tallied at once: K maps are never held together
                    tally.add_candidate(k, out, y)
                else:
                    outs.append(out)
            if isinstance(tally, SegmentationTally):
                tally.add_examples(y)
                tally.nonfinite |= torch.tensor(bad)
            else:
                tally.add(torch.stack(outs), y, top_k, torch.tensor(bad))
            if progress is not None:
                progress("sweep-alpha", tally.n, total_examples)
    except Exception as e:  # re-raised below (on every rank under a process group)
        failure = e
    distributed.raise_if_failed(failure)
    return sweep_result(
        candidates,
        tally,
        metric=metric,
        num_classes=num_classes,
        top_k=top_k,
        strategy="onnxruntime, one graph with alpha/beta/statistics as inputs",
        train_batch_size=train_batch_size,
        notes=[],
        data_hint=data_hint,
    )

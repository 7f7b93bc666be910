"""Inference cost of the corrected-BN ONNX subgraph in onnxruntime (CPU), against the original graph and
against the affine-only floor of the same graph (issue #15).

Three graphs with BN after every conv:

- ResNet-style (BasicBlocks, ResNet-18 layout, 20 BN) and MobileNet-style (MobileNetV1 layout: depthwise
  3x3 + pointwise 1x1, 27 BN), built here in PyTorch and exported with their BN nodes kept
  (``bncorrect.onnx_export.export_plain``: opset 20, symbolic batch), input 3 x size x size;
- ``real``: a generated stand-in for a third-party exported classifier (``benchmarks/real_graph.py``:
  opset 11, 35 BN fed by Constant nodes, input 3x48x192, conv/BN/ReLU stacks with depthwise convs, no
  value_info).

Each graph is timed with its batch dimension symbolic (as exported) and pinned to the batch size (what the
rewrite sees when shapes are static). Compared, in onnxruntime on CPU with ``intra_op_num_threads``
threads, with alpha = beta on every layer:

- ``original``: onnxruntime folds every BN into its Conv at session creation;
- ``floor``:    not a correction: only the per-(N, C) affine step, constant statistics (:func:`build_floor`),
                what any exact subgraph costs at least once BN cannot be folded;
- ``previous``: the formulation before issue #15 (:func:`build_previous`);
- ``naive``:    the straightforward subgraph (:func:`build_naive`);
- ``chosen``:   what ``bncorrect.onnx_rewrite.rewrite`` writes now;
- ``two-pass``: at opset >= 17 only, the chosen subgraph with the two-pass statistics forced instead of
                LayerNormalization (is LayerNormalization still the better choice there?).

Runs are interleaved in rotating order, repeated; the table reports the median of the per-round ratios
(to the original, and to the floor), since the machine may be shared.

    python benchmarks/bench_onnx_inference.py [--nets resnet,mobilenet,real] [--batch-dim both]
        [--repeats 15] [--threads 2] [--numerics]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx import numpy_helper
from real_graph import real_style_graph

from bncorrect.onnx_export import export_plain
from bncorrect.onnx_rewrite import (
    Builder,
    LayerPlan,
    build_fast,
    build_rank2,
    find_bn_nodes,
    finish_layer,
    rewrite,
    rewrite_with,
    statistics_input,
)

# ------------------------------------------------------------------------------------------------ networks


def conv_bn(
    c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2 = conv_bn(c_out, c_out, 3, 1, relu=False)
        self.down = (
            conv_bn(c_in, c_out, 1, stride, relu=False) if stride != 1 or c_in != c_out else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.down(x))


def resnet_style(width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), classes: int = 1000) -> nn.Module:
    """ResNet-18 layout: 20 BN layers."""
    layers: list[nn.Module] = [conv_bn(3, width, 3, 2), nn.MaxPool2d(3, 2, 1)]
    c = width
    for i, n in enumerate(blocks):
        c_out = width * 2**i
        for j in range(n):
            layers.append(BasicBlock(c, c_out, 2 if j == 0 and i > 0 else 1))
            c = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def mobilenet_style(width: float = 1.0, classes: int = 1000) -> nn.Module:
    """MobileNetV1 layout (depthwise + pointwise convs): 27 BN layers."""
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1)]
    c = int(32 * width)
    layers: list[nn.Module] = [conv_bn(3, c, 3, 2)]
    for c_out, s in cfg:
        c_out = int(c_out * width)
        layers += [conv_bn(c, c, 3, s, groups=c), conv_bn(c, c_out, 1, 1)]
        c = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (the timing does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


# ------------------------------------------------------------------------------------- naive formulation


def build_naive(b: Builder, p: LayerPlan) -> None:
    """The straightforward subgraph: ReduceMean, x - mu, square, ReduceMean, a dozen small elementwise ops
    for s and t on (N, C, 1, 1), then y = x * s + t with Mul and Add over the full activation."""
    if p.rank == 2:
        build_rank2(b, p)
        return
    assert p.rank is not None
    r = p.rank
    axes = list(range(2, r))
    pc = lambda v: p.per_channel(v, r)  # noqa: E731
    x = p.x if p.x_type == p.stats_type else b.op("Cast", [p.x], "x_f", to=p.stats_type)
    mu = b.reduce("ReduceMean", x, axes, 1, "mu")
    xc = b.op("Sub", [x, mu], "xc")
    var = b.reduce("ReduceMean", b.op("Mul", [xc, xc], "xc2"), axes, 1, "var")
    d = b.op("Sub", [mu, b.const("mean", pc(p.mean))], "d")
    mu_hat = b.op(
        "Add", [b.const("mean_e", pc(p.mean)), b.op("Mul", [b.const("alpha", pc(p.alpha)), d])], "mu_hat"
    )
    bv = b.op("Mul", [b.const("beta", pc(p.beta)), var])
    ev = b.op("Add", [bv, b.const("var_e", pc((1 - p.beta) * p.var))])
    dd = b.op("Mul", [b.const("bb", pc(p.beta * (1 - p.beta))), b.op("Mul", [d, d])])
    var_hat = b.op("Add", [ev, dd], "var_hat")
    s = b.op(
        "Div",
        [b.const("gamma", pc(p.gamma)), b.op("Sqrt", [b.op("Add", [var_hat, b.const("eps", p.eps)])])],
        "s",
    )
    t = b.op("Sub", [b.const("bias", pc(p.bias)), b.op("Mul", [mu_hat, s])], "t")
    y = b.op("Mul", [x, s], "xs")
    if p.x_type == p.stats_type:
        b.op("Add", [y, t], out=p.y)
    else:
        b.op("Cast", [b.op("Add", [y, t])], out=p.y, to=p.x_type)


def build_floor(b: Builder, p: LayerPlan) -> None:
    """Not a correction: the per-(N, C) affine step of the chosen subgraph alone, with the running
    statistics in place of the example's (no reduction, no small math). What any exact subgraph costs at
    least once the BN can no longer be folded into its Conv: the lower bound for the ratios."""
    assert p.rank is not None and p.rank >= 3
    r = p.rank
    params = (("gamma", p.gamma), ("bias", p.bias), ("mean", p.mean), ("var", p.var))
    if isinstance(p.batch_dim, int) and p.batch_dim > 0:  # static batch: constants, as the rewrite does
        ins = [b.const(k, np.tile(v, p.batch_dim)) for k, v in params]
    else:
        n = b.batch_size(p.x, p.batch_dim)
        ins = [b.op("Tile", [b.const(k, v), n]) for k, v in params]
    xv = b.op("Reshape", [p.x, b.shape([1, -1] + [0] * (r - 2))])
    yv = b.op("BatchNormalization", [xv, *ins], epsilon=float(p.eps))
    b.op("Reshape", [yv, b.shape([-1, p.channels] + [0] * (r - 2))], out=p.y)


# ------------------------------------------------------ statistics from training-mode BatchNormalization


def build_bn_stats(b: Builder, p: LayerPlan) -> None:
    """Exploratory, not adopted (benchmarks/README.md): the statistics from BatchNormalization itself. Over
    the (1, N*C, *spatial) view a training-mode BatchNormalization with momentum 0 returns, as its
    running-statistics outputs, every (example, channel)'s mean and (biased) variance, exact (two-pass) in
    one op (onnxruntime runs training mode in inference sessions, opsets 9-13 through the five-output form);
    its normalized output is not used. Then the per-(N*C) math on them and the affine BN on the view.
    With a symbolic N its running-statistics inputs are Tile outputs, and onnxruntime's basic-level
    optimizations (CommonSubexpressionElimination after ConstantSharing) can merge them with the affine
    step's gamma/bias tiles while the op writes its outputs in place of those inputs: wrong results."""
    x, r = statistics_input(b, p)
    rank = p.rank
    a, be = p.alpha, p.beta
    c = p.channels
    batch = p.batch_dim if isinstance(p.batch_dim, int) and p.batch_dim > 0 else None
    n = None if batch is not None else b.batch_size(x, p.batch_dim)

    def tiled(hint: str, v: np.ndarray) -> str:  # a (C,) term repeated N times, (N*C,)
        if batch is not None:
            return b.const(hint + "_tiled", np.tile(v, batch))
        return b.op("Tile", [b.const(hint, v), n], hint + "_tiled")

    if batch is not None:  # statistics math on (N*C,) with per-channel terms tiled as constants

        def coef(hint: str, v: np.ndarray) -> str:
            v = np.asarray(v, dtype=np.float64)
            return b.const(hint, v if v.ndim == 0 else np.tile(v, batch))

        def nc(t: str) -> str:
            return t

        def flat(t: str) -> str:
            return t

    else:  # symbolic N: statistics viewed as (N, C) against (C,) terms, flattened for the affine BN

        def coef(hint: str, v: np.ndarray) -> str:
            return b.const(hint, np.asarray(v, dtype=np.float64))

        def nc(t: str) -> str:
            return b.op("Reshape", [t, b.shape([-1, c])], t + "_nc")

        def flat(t: str) -> str:
            return b.op("Reshape", [t, b.shape([-1])], t + "_flat")

    xv = b.op("Reshape", [x, b.shape([1, batch * c if batch else -1] + [0] * (r - 2))], "x_view")
    g_in = tiled("gamma", p.gamma)
    b_in = tiled("bias", p.bias)
    if not np.any(be):  # mu_hat only: one ReduceMean
        mu_f = b.reduce("ReduceMean", xv, [0, *range(2, r)], 0, "mu_i")
        var_f = None
    else:
        ones, zeros = tiled("ones", np.ones(c)), tiled("zeros", np.zeros(c))
        n_out = 3 if b.opset >= 14 else 5  # BatchNormalization-9..13: training mode is its 5-output form
        attrs: dict[str, Any] = {"momentum": 0.0, "epsilon": float(p.eps)}
        if b.opset >= 14:
            attrs["training_mode"] = 1
        inputs = [xv, ones, zeros, zeros, ones]
        _, mu_f, var_f, *_rest = b.ops("BatchNormalization", inputs, n_out, "example_stats", **attrs)
    mu = nc(mu_f)
    if np.any(a):  # mu_hat = mu_E + alpha * (mu_i - mu_E)
        m_in = flat(b.op("Add", [b.op("Mul", [mu, coef("alpha", a)], "alpha_mu"),
                                 coef("mean_1ma", (1.0 - a) * p.mean)], "mu_hat"))  # fmt: skip
    else:
        m_in = tiled("mean", p.mean)
    if var_f is None:
        v_in = tiled("var", p.var)
    else:
        terms = [b.op("Mul", [nc(var_f), coef("beta", be)], "beta_var_i")]
        bb = be * (1.0 - be)
        if np.any(bb):
            d = b.op("Sub", [mu, coef("mean", p.mean)], "d")
            terms.append(b.op("Mul", [b.op("Mul", [d, d], "d2"), coef("bb", bb)], "bb_d2"))
        ce = (1.0 - be) * p.var
        if np.any(ce):
            terms.append(coef("var_1mb", ce))
        v_in = flat(b.op("Sum", terms, "var_hat") if len(terms) > 1 else terms[0])
    yv = b.op("BatchNormalization", [xv, g_in, b_in, m_in, v_in], "y_view", epsilon=float(p.eps))
    back = (
        b.shape([batch or -1, c] + [0] * (r - 2)) if rank is not None else b.op("Shape", [p.x], "x_shape")
    )
    finish_layer(b, p, "y", "Reshape", [yv, back])



# --------------------------------------------------------------------------- the formulation before #15


def _previous_stats(b: Builder, p: LayerPlan, x: str, r: int) -> tuple[str, str | None, bool]:
    """Nodes for the per-(example, channel) statistics of ``x`` (rank ``r``, module docstring):
    (mu_i, v, is_inv_std) of shape (N, C, 1, ...), ``v`` 1/sqrt(var_i) (LayerNormalization, opset >= 17) or
    var_i (exact two-pass, older opsets); None when beta = 0 (no variance needed)."""
    axes = list(range(2, r))
    if not np.any(p.beta):
        return b.reduce("ReduceMean", x, axes, 1, "mu_i"), None, False
    if b.opset >= 17:
        spatial = p.spatial_dims(r)
        if spatial is not None:  # a full-shape scale: onnxruntime's broadcast-scale path is ~10x slower
            ones = b.shared_const("ones_" + "x".join(map(str, spatial)), np.ones(spatial), b.np_dtype)
        else:
            one = numpy_helper.from_array(np.ones(1, dtype=b.np_dtype))
            ones = b.op("ConstantOfShape", [b.op("Shape", [x], "spatial_shape", start=2)], "ones", value=one)
        _, mu, inv_std = b.ops("LayerNormalization", [x, ones], 3, "stats", axis=2, epsilon=0.0)
        return mu, inv_std, True
    mu = b.reduce("ReduceMean", x, axes, 1, "mu_i")
    xc = b.op("Sub", [x, mu], "x_centered")
    return mu, b.reduce("ReduceMean", b.op("Mul", [xc, xc], "x_centered_sq"), axes, 1, "var_i"), False


def build_previous(b: Builder, p: LayerPlan) -> None:
    """The formulation bncorrect wrote before issue #15 (kept here for comparison): statistics as now
    (LayerNormalization at opset >= 17, two-pass ReduceMean below), the affine step as BatchNormalization over
    a (1, N*C, ...) view of x with gamma, b Tiled N times at run time and mu_hat, var_hat reshaped."""
    x, r = statistics_input(b, p)
    rank = p.rank
    pc = lambda v: p.per_channel(v, r)  # noqa: E731
    a, be = p.alpha, p.beta
    mu, v, is_inv_std = _previous_stats(b, p, x, r)
    flat = b.shape([-1])
    n = b.batch_size(x, p.batch_dim)
    if np.any(a):  # mu_hat = mu_E + alpha * (mu_i - mu_E)
        ca = b.const("alpha", pc(a))
        mu_hat = b.op(
            "Add", [b.op("Mul", [mu, ca], "alpha_mu"), b.const("mean_1ma", pc((1.0 - a) * p.mean))], "mu_hat"
        )
        m_in = b.op("Reshape", [mu_hat, flat], "mu_hat_flat")
    else:
        m_in = b.op("Tile", [b.const("mean", p.mean), n], "mu_hat_flat")
    if v is not None:  # var_hat = beta * var_i + beta (1 - beta) d^2 + (1 - beta) var_E
        if is_inv_std:
            beta_var = b.op("Div", [b.const("beta", pc(be)), b.op("Mul", [v, v], "inv_var")], "beta_var_i")
        else:
            beta_var = b.op("Mul", [v, b.const("beta", pc(be))], "beta_var_i")
        terms = [beta_var]
        bb = be * (1.0 - be)
        if np.any(bb):
            d = b.op("Sub", [mu, b.const("mean", pc(p.mean))], "d")
            terms.append(b.op("Mul", [b.op("Mul", [d, d], "d2"), b.const("bb", pc(bb))], "bb_d2"))
        ce = (1.0 - be) * p.var
        if np.any(ce):
            terms.append(b.const("var_1mb", pc(ce)))
        var_hat = b.op("Sum", terms, "var_hat") if len(terms) > 1 else terms[0]
        v_in = b.op("Reshape", [var_hat, flat], "var_hat_flat")
    else:
        v_in = b.op("Tile", [b.const("var", p.var), n], "var_hat_flat")
    g_in = b.op("Tile", [b.const("gamma", p.gamma), n], "gamma_tiled")
    b_in = b.op("Tile", [b.const("bias", p.bias), n], "bias_tiled")
    xv = b.op("Reshape", [x, b.shape([1, -1] + [0] * (r - 2))], "x_view")
    yv = b.op("BatchNormalization", [xv, g_in, b_in, m_in, v_in], "y_view", epsilon=float(p.eps))
    back = b.shape([-1, p.channels] + [0] * (r - 2)) if rank is not None else b.op("Shape", [p.x], "x_shape")
    finish_layer(b, p, "y", "Reshape", [yv, back])


# ------------------------------------------------------------------------------------------------ timing

SPIN = True
OPT_LEVEL = "all"


def session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[OPT_LEVEL]
    so.log_severity_level = 3
    if not SPIN:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bench(
    graphs: dict[str, onnx.ModelProto], x: np.ndarray, threads: int, repeats: int, min_time: float
) -> dict[str, list[float]]:
    sessions = {k: session(g, threads) for k, g in graphs.items()}
    name = sessions["original"].get_inputs()[0].name
    feed = {name: x}
    ref = sessions["chosen"].run(None, feed)[0]
    for k in ("previous", "naive", "two-pass", "bn-stats"):  # the same correction, formulated differently
        if k in sessions:
            got = sessions[k].run(None, feed)[0]
            err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))
            if err > 1e-4:
                print(f"    WARNING: {k} differs from chosen by {err:.2g} (relative)", flush=True)
    for s in sessions.values():  # warm up
        for _ in range(2):
            s.run(None, feed)
    # inner loop count so that one measurement lasts >= min_time
    t0 = time.perf_counter()
    sessions["original"].run(None, feed)
    inner = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for rep in range(repeats):
        order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
        for k in order:
            t = time.perf_counter()
            for _ in range(inner):
                sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t) / inner)
    return times


def numerics(size: int = 56) -> None:
    """Relative error of the per-example variance in float32 inside onnxruntime, for |mean| / std = rho:
    one pass (E[x^2] - E[x]^2, ReduceMean + ReduceSumSquare), LayerNormalization's statistics (the chosen
    formulation, opset >= 17) and the exact two-pass form (opset < 17)."""
    from onnx import TensorProto, helper, numpy_helper

    n, c = 4, 16
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    ones = numpy_helper.from_array(np.ones((size, size), np.float32), "ones")
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mu"], keepdims=1),
        helper.make_node("ReduceSumSquare", ["x", "axes"], ["ss"], keepdims=1),
        helper.make_node("LayerNormalization", ["x", "ones"], ["ln_y", "ln_mu", "ln_r"], axis=2, epsilon=0.0),
        helper.make_node("Sub", ["x", "mu"], ["xc"]),
        helper.make_node("Mul", ["xc", "xc"], ["xc2"]),
        helper.make_node("ReduceMean", ["xc2", "axes"], ["var2p"], keepdims=1),
    ]
    outs = ["mu", "ss", "ln_r", "var2p"]
    graph = helper.make_graph(
        nodes,
        "numerics",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, size, size])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [n, c, 1, 1]) for o in outs],
        [axes, ones],
    )
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 1)
    print(f"per-example variance over {size}x{size}, float32, relative error (max over {n}x{c} rows)")
    print("| abs(mean) / std | one pass E[x^2]-E[x]^2 | LayerNormalization (chosen) | two-pass |")
    print("|---|---|---|---|")
    for rho in (1, 10, 30, 100, 1000):
        x = (np.random.default_rng(0).standard_normal((n, c, size, size)) + rho).astype(np.float32)
        exact = x.astype(np.float64).var(axis=(2, 3), keepdims=True)
        mu, ss, r, var2p = sess.run(outs, {"x": x})
        one_pass = ss.astype(np.float64) / (size * size) - mu.astype(np.float64) ** 2
        ln = 1.0 / r.astype(np.float64) ** 2

        def err(v: np.ndarray, exact: np.ndarray = exact) -> str:
            return f"{np.max(np.abs(v - exact) / exact):.1e}"

        print(f"| {rho} | {err(one_pass)} | {err(ln)} | {err(var2p)} |")


def pin_batch(model: onnx.ModelProto, n: int) -> onnx.ModelProto:
    """A copy with the graph input's batch dimension fixed to ``n`` (value_info dropped: shape inference
    recomputes it), i.e. what an exporter writes for a fixed batch size."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for v in [*out.graph.input, *out.graph.output]:
        dim = v.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = n
    del out.graph.value_info[:]
    return out


def graphs_for(original: onnx.ModelProto, alpha: float, bound: bool = False) -> dict[str, onnx.ModelProto]:
    """original, floor (affine only), previous (before #15), naive, chosen (bncorrect.onnx_rewrite.rewrite),
    and at opset >= 17 the two-pass statistics forced (``two-pass``), which the opset < 17 graphs get.
    With ``bound``, also ``mean-only``: what the rewrite writes for beta = 0 (the example's mean only, one
    ReduceMean per layer, no variance): the cheapest data-dependent correction, a lower bound for any
    subgraph that computes a per-example statistic with standard ops."""
    layers = [ly.name for ly in find_bn_nodes(original)]
    coef = dict.fromkeys(layers, alpha)
    out = {"original": original}
    out["floor"] = rewrite_with(original, coef, coef, build=build_floor, formulation="floor", check=False)[0]
    if bound:
        out["mean-only"] = rewrite(original, coef, dict.fromkeys(layers, 0.0))[0]
    out["previous"] = rewrite_with(original, coef, coef, build=build_previous, formulation="previous")[0]
    out["naive"] = rewrite_with(original, coef, coef, build=build_naive, formulation="naive")[0]
    out["chosen"] = rewrite(original, coef, coef)[0]

    def bn_stats(b: Builder, p: LayerPlan) -> None:
        if p.rank == 2:
            build_rank2(b, p)
        else:
            build_bn_stats(b, p)

    out["bn-stats"] = rewrite_with(original, coef, coef, build=bn_stats, formulation="bn-stats")[0]
    if max(o.version for o in original.opset_import if o.domain in ("", "ai.onnx")) >= 17:

        def two_pass(b: Builder, p: LayerPlan) -> None:
            if p.rank == 2:
                build_rank2(b, p)
            else:
                build_fast(b, p, stats="two-pass")

        out["two-pass"] = rewrite_with(original, coef, coef, build=two_pass, formulation="two-pass")[0]
    return out


def host() -> str:
    """``lscpu`` model name and the widest x86 vector extension."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", "x86_64"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    simd = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{name} ({simd}, {os.cpu_count()} cpus)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=112, help="input height = width of the torch nets (112)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds per measurement")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement (inner loop)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--alpha", type=float, default=0.1, help="alpha = beta on every layer (0.1)")
    ap.add_argument(
        "--nets",
        default="resnet,mobilenet,real",
        help="resnet, mobilenet (exported by torch, opset 20), real (a generated opset-11 classifier with "
        "Constant-fed BN, benchmarks/real_graph.py), real17 (the same graph at opset 17, what upgrading the "
        "opset would make of it)",
    )
    ap.add_argument(
        "--batch-dim",
        choices=["dynamic", "static", "both"],
        default="both",
        help="the graphs' batch dimension: symbolic as exported, pinned to the batch size, or both",
    )
    ap.add_argument(
        "--no-spin",
        action="store_true",
        help="session.intra_op.allow_spinning=0 (on a shared machine a spinning worker thread "
        "competes with the main thread)",
    )
    ap.add_argument(
        "--opt-level",
        choices=["all", "extended"],
        default="all",
        help="onnxruntime graph optimization level: 'all' (default; includes the NCHWc layout transform "
        "that fuses Conv+BN+ReLU into blocked-layout kernels) or 'extended' (no layout transform)",
    )
    ap.add_argument("--numerics", action="store_true", help="only print the variance-precision table")
    ap.add_argument(
        "--bound",
        action="store_true",
        help="also time 'mean-only' (the rewrite at beta = 0: one ReduceMean per layer, no variance), the "
        "cheapest data-dependent correction: a lower bound for any exact subgraph with standard ops",
    )
    args = ap.parse_args()
    if args.numerics:
        numerics()
        return
    global SPIN, OPT_LEVEL
    SPIN = not args.no_spin
    OPT_LEVEL = args.opt_level
    import onnxruntime as ort

    print(
        f"# {datetime.date.today()}  host: {host()}  onnxruntime {ort.__version__}  onnx {onnx.__version__}  "
        f"threads={args.threads}  alpha=beta={args.alpha}  opt-level={args.opt_level}  "
        f"spinning={'off' if args.no_spin else 'on'}  rounds={args.repeats}  "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
        flush=True,
    )
    nets = {
        "resnet": (
            "ResNet-style",
            lambda: export_plain(trained_looking(resnet_style()), _example(args.size)),
        ),
        "mobilenet": (
            "MobileNet-style",
            lambda: export_plain(trained_looking(mobilenet_style()), _example(args.size)),
        ),
        "real": ("real-style opset 11 (3x48x192)", real_style_graph),
        "real17": ("real-style at opset 17 (upgraded)", lambda: real_style_graph(opset=17)),
    }
    pins = {"dynamic": [False], "static": [True], "both": [False, True]}[args.batch_dim]
    rows = []
    for key in args.nets.split(","):
        label, make = nets[key]
        exported = make()
        opset = max(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx"))
        in_shape = [d.dim_value for d in exported.graph.input[0].type.tensor_type.shape.dim[1:]]
        for n in (int(v) for v in args.batches.split(",")):
            for pinned in pins:
                original = pin_batch(exported, n) if pinned else exported
                graphs = graphs_for(original, args.alpha, args.bound)
                x = np.random.default_rng(0).standard_normal((n, *in_shape)).astype(np.float32)
                t = bench(graphs, x, args.threads, args.repeats, args.min_time)
                ratio = {
                    k: statistics.median(a / o for a, o in zip(t[k], t["original"], strict=True)) for k in t
                }
                to_floor = {
                    k: statistics.median(a / f for a, f in zip(t[k], t["floor"], strict=True)) for k in t
                }
                naive_chosen = statistics.median(a / c for a, c in zip(t["naive"], t["chosen"], strict=True))
                nodes = {k: len(g.graph.node) for k, g in graphs.items()}
                rows.append(
                    (label, opset, n, "N" if pinned else "?", t, ratio, to_floor, naive_chosen, nodes)
                )
                print(
                    f"  {label} opset {opset} batch {n} ({'static' if pinned else 'dynamic'} N): original "
                    f"{statistics.median(t['original']) * 1e3:.2f} ms; "
                    + ", ".join(
                        f"{k} x{ratio[k]:.3f} (/floor {to_floor[k]:.3f})" for k in t if k != "original"
                    ),
                    flush=True,
                )
    print()
    print("Ratios to the original (and to the floor) — medians of per-round ratios")
    print()
    print(
        "| graph | opset | batch | N in graph | original ms | floor | previous | naive | chosen | two-pass "
        "| chosen / floor | naive / chosen |" + (" mean-only | mean-only / floor |" if args.bound else "")
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.bound else ""))
    for label, opset, n, pin, t, ratio, to_floor, nc, _ in rows:

        def cell(k: str, ratio: dict = ratio, to_floor: dict = to_floor) -> str:
            return f"{ratio[k]:.3f} ({to_floor[k]:.3f})" if k in ratio else "—"

        print(
            f"| {label} | {opset} | {n} | {'static' if pin == 'N' else 'symbolic'} "
            f"| {statistics.median(t['original']) * 1e3:.2f} | {ratio['floor']:.3f} | {cell('previous')} "
            f"| {cell('naive')} | **{cell('chosen')}** | {cell('two-pass')} | {to_floor['chosen']:.3f} "
            f"| {nc:.3f} |"
            + (f" {cell('mean-only')} | {to_floor['mean-only']:.3f} |" if args.bound else "")
        )
    print()
    seen = set()
    for label, _o, _n, pin, *_r, nodes in rows:
        if (label, pin) in seen:
            continue
        seen.add((label, pin))
        print(
            f"nodes ({label}, {'static' if pin == 'N' else 'symbolic'} N): "
            + ", ".join(f"{k} {v}" for k, v in nodes.items())
        )


def _example(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size)


if __name__ == "__main__":
    main()

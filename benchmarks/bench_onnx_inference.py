"""Inference cost of the corrected-BN ONNX subgraph in onnxruntime (CPU).

Two networks built here in PyTorch with BN after every conv — a ResNet-style net (BasicBlocks, ResNet-18
layout) and a MobileNet-style net (MobileNetV1 layout: depthwise 3x3 + pointwise 1x1) — are exported with
their BN nodes kept (``bncorrect.onnx_export.export_plain``) and compared, in onnxruntime on CPU with
``intra_op_num_threads`` threads:

- ``original``: the exported graph; onnxruntime folds every BN into its Conv at session creation;
- ``chosen``:   rewritten by ``bncorrect.onnx_rewrite.rewrite`` with alpha = beta = 0.25 on every layer;
- ``naive``:    the same correction as a straightforward subgraph (two reductions and a dozen elementwise
                ops per layer, :func:`build_naive` below), for scale.

Runs are interleaved (original, chosen, naive, ... in rotating order, repeated) and the table reports
median latencies and the median of the per-round ratios, since the machine may be shared.

    python benchmarks/bench_onnx_inference.py [--size 112] [--repeats 15] [--threads 2]
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

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bncorrect.onnx_export import export_plain
from bncorrect.onnx_rewrite import Builder, LayerPlan, build_rank2, find_bn_nodes, rewrite, rewrite_with

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
    n = b.batch_size(p.x, p.batch_dim)
    ins = [
        b.op("Tile", [b.const(k, v), n])
        for k, v in (("gamma", p.gamma), ("bias", p.bias), ("mean", p.mean), ("var", p.var))
    ]
    xv = b.op("Reshape", [p.x, b.shape([1, -1] + [0] * (r - 2))])
    yv = b.op("BatchNormalization", [xv, *ins], epsilon=float(p.eps))
    b.op("Reshape", [yv, b.shape([-1, p.channels] + [0] * (r - 2))], out=p.y)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=112, help="input height = width (default 112)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement (inner loop)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--nets", default="resnet,mobilenet")
    ap.add_argument(
        "--floor", action="store_true", help="also time the affine-only lower bound (build_floor)"
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
    args = ap.parse_args()
    if args.numerics:
        numerics()
        return
    global SPIN, OPT_LEVEL
    SPIN = not args.no_spin
    OPT_LEVEL = args.opt_level
    import onnxruntime as ort

    print(
        f"# {datetime.date.today()}  onnxruntime {ort.__version__}  onnx {onnx.__version__}  torch "
        f"{torch.__version__}  {platform.processor() or platform.machine()}  threads={args.threads}  "
        f"input 3x{args.size}x{args.size}  alpha=beta={args.alpha}  opt-level={args.opt_level}  "
        f"spinning={'off' if args.no_spin else 'on'}  cpus={os.cpu_count()}"
    )
    nets = {"resnet": ("ResNet-style", resnet_style), "mobilenet": ("MobileNet-style", mobilenet_style)}
    rows = []
    for key in args.nets.split(","):
        label, factory = nets[key]
        model = trained_looking(factory())
        example = torch.randn(1, 3, args.size, args.size)
        original = export_plain(model, example)
        layers = [ly.name for ly in find_bn_nodes(original)]
        coef = dict.fromkeys(layers, args.alpha)
        chosen, _ = rewrite(original, coef, coef)
        naive, _ = rewrite_with(original, coef, coef, build=build_naive, formulation="naive")
        graphs = {"original": original, "chosen": chosen, "naive": naive}
        if args.floor:
            graphs["floor"] = rewrite_with(
                original, coef, coef, build=build_floor, formulation="floor", check=False
            )[0]
        per_layer = {
            k: (len(g.graph.node) - len(original.graph.node)) / len(layers) + 1
            for k, g in graphs.items()
            if k != "original"
        }
        for n in (int(v) for v in args.batches.split(",")):
            x = np.random.default_rng(0).standard_normal((n, 3, args.size, args.size)).astype(np.float32)
            t = bench(graphs, x, args.threads, args.repeats, args.min_time)
            r_chosen = statistics.median(c / o for c, o in zip(t["chosen"], t["original"], strict=True))
            r_naive = statistics.median(c / o for c, o in zip(t["naive"], t["original"], strict=True))
            r_floor = (
                statistics.median(c / o for c, o in zip(t["floor"], t["original"], strict=True))
                if "floor" in t
                else float("nan")
            )
            rows.append(
                (
                    label,
                    len(layers),
                    n,
                    statistics.median(t["original"]) * 1e3,
                    statistics.median(t["chosen"]) * 1e3,
                    statistics.median(t["naive"]) * 1e3,
                    r_chosen,
                    r_naive,
                    r_naive / r_chosen,
                    r_floor,
                    per_layer,
                )
            )
            print(
                f"  {label} batch {n}: original {rows[-1][3]:.2f} ms, chosen x{r_chosen:.3f}, "
                f"naive x{r_naive:.3f}"
                f", floor x{r_floor:.3f}",
                flush=True,
            )
    print()
    print(
        "| net | BN layers | batch | original ms | chosen ms | naive ms | chosen / original "
        "| naive / original "
        "| naive / chosen | floor / original |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, nl, n, o, c, nv, rc, rn, rnc, rf, _ in rows:
        print(
            f"| {label} | {nl} | {n} | {o:.2f} | {c:.2f} | {nv:.2f} | {rc:.3f} | {rn:.3f} | {rnc:.2f} "
            f"| {rf:.3f} |"
        )
    print()
    for label, *_rest, per_layer in rows[:: len(args.batches.split(","))]:
        print(f"nodes per BN layer ({label}): " + ", ".join(f"{k} {v:.0f}" for k, v in per_layer.items()))


if __name__ == "__main__":
    main()

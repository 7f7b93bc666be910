"""Design choices of ``bncorrect.onnx_passes`` (recalibrate / sweep-alpha on ONNX graphs), measured.

1. ``sweep``: K candidates per batch with one graph whose BN layers read alpha, beta and the running
   statistics from graph inputs (what onnx_passes does: ``sweep_graph``, one session fed K times) against
   one corrected graph per candidate (the graph ``rewrite`` writes, constants folded, EMA = the original
   graph with BN folded into the Conv; K sessions). Session creation (and graph building) timed apart.
2. ``recalibrate --upstream eval``: one session per layer on the graph pruned to that layer's input, the
   earlier layers recalibrated as constants (what onnx_passes does) against one session over the whole
   graph with every BN's running statistics as graph inputs and every BN input as an output, run once
   per layer (:func:`stats_as_inputs`).

Networks: benchmarks/common.py's ResNet- and MobileNet-style nets (3x32x32 input), exported with BN kept
(``export_plain``). Runs are interleaved and repeated (median), since the machine may be shared.

    python benchmarks/bench_onnx_passes.py [--batch 256] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, machine, mobilenet_like, resnet_like

from bncorrect.onnx_export import export_plain
from bncorrect.onnx_passes import (
    GraphRunner,
    _candidate_feeds,
    correctable_layers,
    recalibrate_onnx,
    sweep_graph,
    tap_graph,
)
from bncorrect.onnx_rewrite import rewrite_with
from bncorrect.recalibration import PopulationMoments
from bncorrect.sweep import DEFAULT_ALPHAS, build_candidates


def stats_as_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """Every BN's mean/var fed from graph inputs; every BN input a graph output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = correctable_layers(model)
    by_input = {}
    for node in out.graph.node:
        if node.op_type == "BatchNormalization":
            by_input[node.input[0]] = node
    feeds = []
    for ly in layers:
        node = by_input[ly.x]
        m, v = f"{ly.name}/mean_in", f"{ly.name}/var_in"
        node.input[3], node.input[4] = m, v
        for name in (m, v):
            out.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [ly.channels]))
        out.graph.output.append(helper.make_empty_tensor_value_info(ly.x))
        feeds.append((ly.x, m, v))
    return out, feeds


def session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bench_sweep(name: str, proto: onnx.ModelProto, x: np.ndarray, threads: int, repeats: int) -> None:
    layers = correctable_layers(proto)
    alphas = list(DEFAULT_ALPHAS)
    t = time.perf_counter()
    graph, specs = sweep_graph(proto, layers)
    feeds = _candidate_feeds(build_candidates(alphas), layers, specs)
    one = session(graph, threads)
    t_inputs = time.perf_counter() - t
    t = time.perf_counter()
    per_alpha = []
    for a in alphas:
        coef = {ly.name: a for ly in layers}
        per_alpha.append(session(rewrite_with(proto, coef, coef, check=False)[0], threads))
    t_per_alpha = time.perf_counter() - t
    inp = per_alpha[0].get_inputs()[0].name

    def run_inputs() -> list[np.ndarray]:
        return [one.run(None, {inp: x, **f})[0] for f in feeds]

    def run_per_alpha() -> list[np.ndarray]:
        return [s.run(None, {inp: x})[0] for s in per_alpha]

    diff = max(float(np.abs(p - q).max()) for p, q in zip(run_inputs(), run_per_alpha(), strict=True))
    times = interleaved({"inputs": run_inputs, "per-alpha": run_per_alpha}, repeats)
    print(
        f"| sweep | {name} | {x.shape[0]} | {len(alphas)} | {1e3 * times['inputs']:.0f} "
        f"| {1e3 * times['per-alpha']:.0f} | **{times['inputs'] / times['per-alpha']:.2f}** "
        f"| {1e3 * t_inputs:.0f} | {1e3 * t_per_alpha:.0f} | {diff:.1e} |"
    )


def bench_recalibrate(name: str, proto: onnx.ModelProto, x: np.ndarray, threads: int, repeats: int) -> None:
    batches = [(torch.from_numpy(x[i : i + 128]),) for i in range(0, x.shape[0], 128)]
    layers = correctable_layers(proto)
    graph, feeds = stats_as_inputs(proto)
    inp = proto.graph.input[0].name

    def chosen() -> dict:
        return recalibrate_onnx(proto, batches, upstream="eval", device="cpu", threads=threads).stats

    def inputs() -> dict:
        sess = session(graph, threads)
        stats = {ly.name: (ly.running_mean.float().numpy(), ly.running_var.float().numpy()) for ly in layers}
        for k, ly in enumerate(layers):
            mom = PopulationMoments(ly.channels)
            for (xb,) in batches:
                feed = {inp: xb.numpy()}
                for lyr, (_, m, v) in zip(layers, feeds, strict=True):
                    feed[m], feed[v] = stats[lyr.name]
                mom.add(torch.from_numpy(sess.run([feeds[k][0]], feed)[0]))
            stats[ly.name] = (mom.mean.float().numpy(), mom.variance().float().numpy())
        return stats

    a, b = chosen(), inputs()
    diff = max(float(np.abs(a[n][1].numpy() - b[n][1]).max()) for n in a)
    t = time.perf_counter()
    for ly in layers:
        GraphRunner(tap_graph(proto, [ly.x]), [ly.x], device="cpu", threads=threads)
    t_sessions = time.perf_counter() - t
    times = interleaved({"chosen": chosen, "inputs": inputs}, repeats)
    print(
        f"| recalibrate eval | {name} | {x.shape[0]} | {len(layers)} | {1e3 * times['chosen']:.0f} "
        f"| {1e3 * times['inputs']:.0f} | **{times['chosen'] / times['inputs']:.2f}** "
        f"| {1e3 * t_sessions:.0f} | - | {diff:.1e} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"# {machine()}")
    print(
        "| pass | net | examples | K or layers | chosen ms | alternative ms | chosen / alternative "
        "| chosen sessions ms | alternative sessions ms | max diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    for name, net in (("ResNet-style", resnet_like()), ("MobileNet-style", mobilenet_like())):
        proto = export_plain(net, torch.from_numpy(x[:2]))
        bench_sweep(name, proto, x, args.threads, args.repeats)
        bench_recalibrate(name, proto, x, args.threads, args.repeats)


if __name__ == "__main__":
    main()

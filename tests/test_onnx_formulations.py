"""Parity of every formulation the ONNX rewrite writes (bncorrect.onnx_rewrite module docstring, issue #15)
with the PyTorch corrected layer (bncorrect.correction.corrected_batch_norm): every opset from 9 to the
newest that both onnx and onnxruntime support, ranks 2-5, symbolic and static batch dimension, Constant-fed
parameters, fp16, and a generated opset-11 classifier (benchmarks/real_graph.py) layer by layer. Every
written graph passes onnx.checker (full check) and runs in an onnxruntime session."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from bncorrect.correction import corrected_batch_norm
from bncorrect.onnx_rewrite import (
    _ort_max_opset,
    build_fast,
    build_rank2,
    find_bn_nodes,
    rewrite,
    rewrite_with,
)

from .reference import corrected_bn_reference
from .test_onnx_rewrite import ALPHA_VEC, BETA_VEC, EPS, C, bn_graph, check, reference, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from real_graph import real_style_graph

NEWEST = min(onnx.defs.onnx_opset_version(), _ort_max_opset(10, onnx.defs.onnx_opset_version() + 1))
OPSETS = list(range(9, NEWEST + 1))
BATCH = 3
COEFS = ((0.3, 0.3), (ALPHA_VEC, BETA_VEC), (1.0, 1.0), (0.2, 0.0), (0.0, 0.6), (1.0, 0.4))


def pin_batch(model: onnx.ModelProto, n: int) -> onnx.ModelProto:
    """The graph with its input's and output's batch dimension fixed to ``n`` (static N)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for v in [*out.graph.input[:1], *out.graph.output]:
        if v.type.tensor_type.shape.dim:
            dim = v.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = n
    return out


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _close(got: np.ndarray, ref: np.ndarray, tol: float) -> None:
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= tol * max(1.0, float(np.abs(ref).max())), err


@pytest.mark.parametrize("static", [False, True], ids=["symbolic_n", "static_n"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("opset", OPSETS)
def test_every_opset_rank_and_batch_dimension(opset: int, rank: int, static: bool) -> None:
    model, p = bn_graph(rank, opset, dynamic=False)
    if static:
        model = pin_batch(model, BATCH)
    shape = [BATCH, C] + [5 + i for i in range(rank - 2)]
    x = (np.random.default_rng(opset).standard_normal(shape) * 1.5 + 0.7).astype(np.float32)
    for alpha, beta in COEFS:
        out, report = rewrite(model, {"bn": alpha}, {"bn": beta})
        check(out)
        assert report.rewritten == ["bn"]
        _close(run(out, {"x": x}), reference(x, p, alpha, beta), 1e-4)
        if static and rank > 2:  # static shapes: no run-time shape arithmetic
            ops = _ops(out)
            assert not ops["Shape"] and not ops["Slice"] and not ops["Tile"], ops


@pytest.mark.parametrize("static", [False, True], ids=["symbolic_n", "static_n"])
@pytest.mark.parametrize("opset", OPSETS)
def test_near_zero_correction_matches_the_original_graph(opset: int, static: bool) -> None:
    """alpha = 0 (beta ~ 0 forces the subgraph): the plain BN's output within 1e-5, on every path."""
    for rank in (2, 4):
        model, _ = bn_graph(rank, opset, dynamic=False)
        if static:
            model = pin_batch(model, BATCH)
        x = (np.random.default_rng(5).standard_normal([BATCH, C, *[5, 6][: rank - 2]]) + 0.5).astype(
            np.float32
        )
        original = run(model, {"x": x})
        for alpha, beta in ((0.0, 1e-9), (1e-9, 0.0), (0.0, np.r_[0.0, np.full(C - 1, 1e-9)])):
            out, _ = rewrite(model, {"bn": alpha}, {"bn": beta})
            check(out)
            _close(run(out, {"x": x}), original, 1e-5)


@pytest.mark.parametrize("opset", [o for o in OPSETS if o >= 17])
@pytest.mark.parametrize("static", [False, True], ids=["symbolic_n", "static_n"])
def test_two_pass_statistics_forced_at_new_opsets(opset: int, static: bool) -> None:
    """The alternative the benchmark compares at opset >= 17 (build_fast(stats="two-pass")) is exact too."""

    def two_pass(b, p) -> None:
        build_rank2(b, p) if p.rank == 2 else build_fast(b, p, stats="two-pass")

    model, p = bn_graph(4, opset, dynamic=False)
    if static:
        model = pin_batch(model, BATCH)
    x = (np.random.default_rng(2).standard_normal((BATCH, C, 5, 6)) * 2).astype(np.float32)
    for alpha, beta in COEFS:
        out, _ = rewrite_with(model, {"bn": alpha}, {"bn": beta}, build=two_pass, formulation="two-pass")
        check(out)
        assert not _ops(out)["LayerNormalization"]
        _close(run(out, {"x": x}), reference(x, p, alpha, beta), 1e-4)


def test_layernorm_needs_opset_17() -> None:
    model, _ = bn_graph(4, 13)
    with pytest.raises(ValueError, match="opset >= 17"):
        rewrite_with(model, {"bn": 0.3}, {"bn": 0.3}, build=lambda b, p: build_fast(b, p, stats="layernorm"))


@pytest.mark.parametrize("static", [False, True], ids=["symbolic_n", "static_n"])
@pytest.mark.parametrize("opset", [9, 11, 13, 16, 17, NEWEST])
def test_constant_fed_parameters(opset: int, static: bool) -> None:
    model, p = bn_graph(4, opset, feed="constant", dynamic=False)
    if static:
        model = pin_batch(model, BATCH)
    x = (np.random.default_rng(3).standard_normal((BATCH, C, 5, 6)) + 1.0).astype(np.float32)
    for alpha, beta in ((0.1, 0.1), (ALPHA_VEC, BETA_VEC)):
        out, report = rewrite(model, {"bn": alpha}, {"bn": beta})
        check(out)
        assert report.rewritten == ["bn"]
        assert not [n for n in out.graph.node if n.op_type == "Constant" and n.output[0].startswith("bn.")]
        _close(run(out, {"x": x}), reference(x, p, alpha, beta), 1e-4)


@pytest.mark.parametrize("static", [False, True], ids=["symbolic_n", "static_n"])
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("opset", [9, 11, 13, 16, 17, NEWEST])
def test_fp16(opset: int, rank: int, static: bool) -> None:
    """fp16 graphs: statistics in float32 (cast up and back), one rounding to fp16 at the end."""
    model, p = bn_graph(rank, opset, dtype=TP.FLOAT16, dynamic=False)
    if static:
        model = pin_batch(model, BATCH)
    x = (np.random.default_rng(4).standard_normal([BATCH, C, *[5, 6][: rank - 2]]) * 2).astype(np.float16)
    out, _ = rewrite(model, {"bn": 0.3}, {"bn": BETA_VEC})
    check(out)
    got = run(out, {"x": x})
    assert got.dtype == np.float16
    t = {k: torch.tensor(v.astype(np.float16).astype(np.float32)) for k, v in p.items()}
    ref = corrected_batch_norm(
        torch.relu(torch.from_numpy(x)), t["mean"], t["var"], t["scale"], t["bias"], EPS, 0.3,
        torch.tensor(BETA_VEC, dtype=torch.float32),
    ).numpy()  # fmt: skip
    assert ref.dtype == np.float16
    _close(got, ref, 2e-3)


def test_static_path_against_the_loop_reference_with_a_far_off_mean() -> None:
    """The (1, N*C, ...) static-batch path against the float64 loop reference, |mean| = 1000 std: the
    two-pass variance stays exact."""
    model, p = bn_graph(4, 11, dynamic=False)
    model = pin_batch(model, 2)
    x = (np.random.default_rng(0).standard_normal((2, C, 5, 6)) * 0.05 + 50.0).astype(np.float32)
    out, _ = rewrite(model, {"bn": 0.5}, {"bn": 1.0})
    check(out)
    ref = corrected_bn_reference(np.maximum(x, 0), p["mean"], p["var"], p["scale"], p["bias"], EPS, 0.5, 1.0)
    _close(run(out, {"x": x}), ref, 1e-4)


@pytest.mark.parametrize("batch", [None, 2])
def test_generated_real_style_graph_layer_by_layer(batch: int | None) -> None:
    """The opset-11 Paddle-style classifier (Constant-fed BN, no value_info): every rewritten layer's output
    equals the PyTorch corrected layer applied to that layer's input, read from the same session."""
    blocks = ((16, (1, 1)), (32, (2, 2)), (32, (2, 1)))
    model = real_style_graph(height=16, width=32, batch=batch, blocks=blocks, stem=8, classes=5)
    layers = find_bn_nodes(model)
    assert len(layers) == 7 and all(ly.correctable for ly in layers)
    alpha = {ly.name: 0.1 + 0.1 * k for k, ly in enumerate(layers)}
    out, report = rewrite(model, alpha, alpha)
    check(out)
    assert report.rewritten == [ly.name for ly in layers]
    bn_nodes = [model.graph.node[ly.node_index] for ly in layers]
    consts = {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t).copy()
        for n in model.graph.node
        if n.op_type == "Constant"
    }
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    for node in bn_nodes:
        for name in (node.input[0], node.output[0]):
            probe.graph.output.append(helper.make_tensor_value_info(name, TP.FLOAT, None))
    names = [o.name for o in probe.graph.output]
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 32)).astype(np.float32)
    values = dict(zip(names, run_all(probe, {"x": x}), strict=True))
    for ly, node in zip(layers, bn_nodes, strict=True):
        g, b, m, v = (torch.from_numpy(consts[i]) for i in node.input[1:5])
        ref = corrected_batch_norm(
            torch.from_numpy(values[node.input[0]]), m, v, g, b, 1e-5, alpha[ly.name], alpha[ly.name]
        )
        _close(values[node.output[0]], ref.numpy(), 1e-4)


def run_all(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, feed
    )

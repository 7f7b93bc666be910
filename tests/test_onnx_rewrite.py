"""ONNX rewrite of BatchNormalization nodes (bncorrect.onnx_rewrite): graphs built in code with onnx.helper,
run in onnxruntime and compared with bncorrect.correction.corrected_batch_norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from bncorrect.correction import corrected_batch_norm
from bncorrect.errors import NoBatchNormError, OnnxError
from bncorrect.onnx_rewrite import (
    find_bn_nodes,
    load_onnx,
    match_layers,
    rewrite,
    save_onnx,
)

NEWEST = onnx.defs.onnx_opset_version()
TORCH_SUFFIX = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
C = 6
EPS = 1e-3


def _params(rng: np.random.Generator, c: int = C) -> dict[str, np.ndarray]:
    return {
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.standard_normal(c),
        "mean": rng.standard_normal(c),
        "var": rng.uniform(0.2, 2.0, c),
    }


def bn_graph(
    rank: int = 4,
    opset: int = 17,
    *,
    feed: str = "init",
    dtype: int = TP.FLOAT,
    dynamic: bool = True,
    known_rank: bool = True,
    node_attrs: dict | None = None,
    extra_outputs: int = 0,
    name: str = "bn",
    prefix: str = "bn",
    seed: int = 0,
    channels: int = C,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Relu -> BatchNormalization -> y; parameters fed as initializers, Constant nodes, Identity of
    initializers, or computed by a Mul node ('computed')."""
    rng = np.random.default_rng(seed)
    p = _params(rng, channels)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    shape = ["N", channels] + ([f"S{i}" if dynamic else 5 + i for i in range(rank - 2)])
    nodes, inits = [], []
    names = {}
    for k, v in p.items():
        tname = f"{prefix}.{TORCH_SUFFIX[k]}"
        arr = v.astype(np_dtype)
        if feed == "init":
            inits.append(numpy_helper.from_array(arr, tname))
        elif feed == "constant":
            nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [tname],
                    name=f"const_{k}",
                    value=numpy_helper.from_array(arr, f"{tname}_value"),
                )
            )
        elif feed == "identity":
            inits.append(numpy_helper.from_array(arr, f"onnx::{k}"))
            nodes.append(helper.make_node("Identity", [f"onnx::{k}"], [tname], name=f"Identity_{k}"))
        elif feed == "computed" and k == "var":
            inits.append(numpy_helper.from_array((arr / 2).astype(np_dtype), "half_var"))
            inits.append(numpy_helper.from_array(np.array(2, dtype=np_dtype), "two"))
            nodes.append(helper.make_node("Mul", ["half_var", "two"], [tname], name="scale_var"))
        else:
            inits.append(numpy_helper.from_array(arr, tname))
        names[k] = tname
    inputs = [helper.make_tensor_value_info("x", dtype, shape)]
    if known_rank:
        nodes.append(helper.make_node("Relu", ["x"], ["h"], name="relu"))
    else:  # a run-time shape makes the BN input's rank unknown to shape inference
        inputs.append(helper.make_tensor_value_info("shape", TP.INT64, ["K"]))
        nodes.append(helper.make_node("Reshape", ["x", "shape"], ["h"], name="reshape"))
    outs = ["y"] + [f"extra{i}" for i in range(extra_outputs)]
    nodes.append(
        helper.make_node(
            "BatchNormalization",
            ["h", names["scale"], names["bias"], names["mean"], names["var"]],
            outs,
            name=name,
            epsilon=EPS,
            **(node_attrs or {}),
        )
    )
    if known_rank:
        nodes.append(helper.make_node("Identity", ["y"], ["out"], name="out"))
        outputs = [helper.make_tensor_value_info("out", dtype, shape)]
    else:  # a rank-free graph output: reduce everything
        nodes.append(helper.make_node("Identity", ["y"], ["out"], name="out"))
        nodes.append(helper.make_node("ReduceSum", ["out"], ["total"], name="total", keepdims=0))
        outputs = [helper.make_tensor_value_info("total", dtype, [])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return model, p


def run(model: onnx.ModelProto | str | Path, feed: dict[str, np.ndarray], output: str = "out") -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    if isinstance(model, onnx.ModelProto) and output not in {o.name for o in model.graph.output}:
        model = onnx.ModelProto.FromString(src)
        model.graph.output.append(helper.make_empty_tensor_value_info(output))
        model.graph.output[-1].type.tensor_type.elem_type = model.graph.output[0].type.tensor_type.elem_type
        src = model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run([output], feed)[0]


def reference(x: np.ndarray, p: dict[str, np.ndarray], alpha, beta) -> np.ndarray:
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in p.items()}
    xt = torch.relu(torch.from_numpy(x))
    a = torch.as_tensor(np.asarray(alpha, dtype=np.float32))
    b = torch.as_tensor(np.asarray(beta, dtype=np.float32))
    return corrected_batch_norm(xt, t["mean"], t["var"], t["scale"], t["bias"], EPS, a, b).numpy()


def input_for(rank: int, batch: int = 3, seed: int = 1, dtype=np.float32, channels: int = C) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = [batch, channels] + [4 + 2 * i for i in range(rank - 2)]
    return (rng.standard_normal(shape) * 1.5 + 0.7).astype(dtype)


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


# ------------------------------------------------------------------------------------------------ parity

ALPHA_VEC = np.linspace(0.05, 0.9, C)
BETA_VEC = np.linspace(0.8, 0.1, C)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, NEWEST])
def test_parity_every_rank_and_opset(rank: int, opset: int) -> None:
    model, p = bn_graph(rank, opset)
    for alpha, beta in ((0.3, 0.3), (ALPHA_VEC, BETA_VEC), (1.0, 1.0), (0.2, 0.0)):
        out, report = rewrite(model, {"bn": alpha}, {"bn": beta})
        check(out)
        assert report.rewritten == ["bn"]
        x = input_for(rank)
        got = run(out, {"x": x})
        ref = reference(x, p, alpha, beta)
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("opset", [13, 18])
def test_dynamic_dims_other_batch_and_spatial_sizes(rank: int, opset: int) -> None:
    model, p = bn_graph(rank, opset, dynamic=True)
    out, _ = rewrite(model, {"bn": 0.4}, {"bn": 0.25})
    for batch, seed in ((1, 3), (5, 4)):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal([batch, C] + [3 + seed + i for i in range(rank - 2)]).astype(np.float32)
        assert np.allclose(run(out, {"x": x}), reference(x, p, 0.4, 0.25), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_static_shapes(opset: int) -> None:
    model, p = bn_graph(4, opset, dynamic=False)
    out, _ = rewrite(model, {"bn": ALPHA_VEC}, {"bn": 0.5})
    check(out)
    x = (np.random.default_rng(2).standard_normal((3, C, 5, 6)) * 3).astype(np.float32)
    assert np.allclose(run(out, {"x": x}), reference(x, p, ALPHA_VEC, 0.5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("rank", [2, 4])
def test_unknown_rank_uses_shape_free_subgraph(opset: int, rank: int) -> None:
    model, p = bn_graph(rank, opset, known_rank=False)
    assert find_bn_nodes(model)[0].rank is None
    out, _ = rewrite(model, {"bn": 0.3}, {"bn": 0.6})
    check(out)
    x = input_for(rank)
    shape = np.array(x.shape, dtype=np.int64)
    got = run(out, {"x": x, "shape": shape}, output="out")
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in p.items()}
    ref = corrected_batch_norm(torch.from_numpy(x), t["mean"], t["var"], t["scale"], t["bias"], EPS, 0.3, 0.6)
    assert np.allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)


def test_large_mean_relative_to_std_stays_exact() -> None:
    """The variance is computed exactly (not as E[x^2] - E[x]^2, which cancels in float32)."""
    for opset in (13, 18):
        model, p = bn_graph(4, opset)
        out, _ = rewrite(model, {"bn": 0.5}, {"bn": 1.0})
        rng = np.random.default_rng(0)
        x = (rng.standard_normal((2, C, 16, 16)) * 0.05 + 50.0).astype(np.float32)  # |mean| = 1000 std
        got = run(out, {"x": x})
        ref = reference(x, p, 0.5, 1.0)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_zero_correction_matches_original_graph() -> None:
    model, _ = bn_graph(4, 18)
    x = input_for(4)
    original = run(model, {"x": x})
    out, _ = rewrite(model, {"bn": 1e-12}, {"bn": 1e-12})  # forces the subgraph with alpha, beta ~ 0
    assert np.abs(run(out, {"x": x}) - original).max() <= 1e-5
    for rank in (2, 3):
        m, _ = bn_graph(rank, 13)
        xr = input_for(rank)
        o, _ = rewrite(m, {"bn": 1e-12}, {"bn": 0.0})
        assert np.abs(run(o, {"x": xr}) - run(m, {"x": xr})).max() <= 1e-5


def test_identity_layers_keep_the_node_byte_identical() -> None:
    model, _ = bn_graph(4, 17)
    extra, _ = bn_graph(4, 17, name="bn2", prefix="bn2", seed=3)
    # two BN layers in one graph: out -> bn2
    g = model.graph
    bn2 = next(n for n in extra.graph.node if n.op_type == "BatchNormalization")
    bn2.input[0] = "out"
    bn2.output[0] = "out2"
    g.node.append(bn2)
    g.initializer.extend(extra.graph.initializer)
    g.output[0].name = "out2"
    check(model)
    before = {n.name: n.SerializeToString() for n in g.node}
    out, report = rewrite(model, {"bn": 0.0, "bn2": 0.3}, {"bn": 0.0, "bn2": 0.3})
    check(out)
    assert report.kept == ["bn"] and report.rewritten == ["bn2"]
    after = {n.name: n.SerializeToString() for n in out.graph.node}
    assert after["bn"] == before["bn"] and after["relu"] == before["relu"] and after["out"] == before["out"]
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == [
        o.SerializeToString() for o in model.graph.output
    ]
    same, rep2 = rewrite(model, {}, {})
    assert same.SerializeToString() == model.SerializeToString() and rep2.kept == ["bn", "bn2"]


# ------------------------------------------------------------------------------------------ graph variants


@pytest.mark.parametrize("feed", ["constant", "identity"])
def test_constant_and_identity_fed_parameters(feed: str) -> None:
    model, p = bn_graph(4, 13, feed=feed)
    layer = find_bn_nodes(model)[0]
    assert layer.correctable and layer.torch_name == "bn"
    out, report = rewrite(model, {"bn": ALPHA_VEC}, {"bn": BETA_VEC})
    check(out)
    assert report.rewritten == ["bn"]
    assert not [n for n in out.graph.node if n.op_type in ("Constant", "Identity") and n.name != "out"]
    x = input_for(4)
    assert np.allclose(run(out, {"x": x}), reference(x, p, ALPHA_VEC, BETA_VEC), atol=1e-4, rtol=1e-4)


def test_parameters_computed_upstream_are_refused_naming_the_node() -> None:
    model, _ = bn_graph(4, 13, feed="computed")
    layer = find_bn_nodes(model)[0]
    assert not layer.correctable and "scale_var" in layer.reason and "Mul" in layer.reason
    out, report = rewrite(model, {"bn": 0.3}, {"bn": 0.3})
    assert report.rewritten == [] and report.skipped[0][0] == "bn" and "scale_var" in report.skipped[0][1]
    assert out.graph.SerializeToString() == model.graph.SerializeToString()


def test_training_mode_node_is_refused() -> None:
    model, _ = bn_graph(4, 15, node_attrs={"training_mode": 1})
    layer = find_bn_nodes(model)[0]
    assert not layer.correctable and "training_mode" in layer.reason
    _, report = rewrite(model, {"bn": 0.3}, {"bn": 0.3})
    assert report.skipped and "training_mode" in report.skipped[0][1]


def test_training_outputs_are_refused() -> None:
    model, _ = bn_graph(4, 9, extra_outputs=2)
    layer = find_bn_nodes(model)[0]
    assert not layer.correctable and "training" in layer.reason


@pytest.mark.parametrize("opset", [13, 18])
def test_fp16_model(opset: int) -> None:
    model, p = bn_graph(4, opset, dtype=TP.FLOAT16)
    out, _ = rewrite(model, {"bn": 0.3}, {"bn": ALPHA_VEC})
    check(out)
    x = input_for(4, dtype=np.float16)
    got = run(out, {"x": x})
    assert got.dtype == np.float16
    p16 = {k: v.astype(np.float16).astype(np.float32) for k, v in p.items()}  # what the graph stores
    t = {k: torch.tensor(v) for k, v in p16.items()}
    ref = corrected_batch_norm(
        torch.relu(torch.from_numpy(x)),
        t["mean"],
        t["var"],
        t["scale"],
        t["bias"],
        EPS,
        0.3,
        torch.tensor(ALPHA_VEC, dtype=torch.float32),
    ).numpy()
    assert ref.dtype == np.float16
    # statistics in float32, one rounding to fp16 at the end: at most one fp16 ulp apart
    assert np.abs(got.astype(np.float32) - ref.astype(np.float32)).max() <= 2e-3 * np.abs(ref).max()


def test_unnamed_and_duplicate_node_names_get_stable_unique_names() -> None:
    model, _ = bn_graph(4, 13, name="")
    layer = find_bn_nodes(model)[0]
    assert layer.name == "BatchNormalization:y"
    out, report = rewrite(model, {layer.name: 0.2}, {layer.name: 0.2})
    assert report.rewritten == [layer.name]
    check(out)


def test_rewritten_graph_is_not_rewritten_twice() -> None:
    model, _ = bn_graph(4, 18)
    out, _ = rewrite(model, {"bn": 0.3}, {"bn": 0.3})
    assert find_bn_nodes(out) == []
    with pytest.raises(NoBatchNormError, match="already rewritten"):
        rewrite(out, {"bn": 0.3}, {"bn": 0.3})


def test_recalibrated_statistics_keep_a_plain_bn() -> None:
    model, p = bn_graph(4, 13)
    new_mean, new_var = np.linspace(-1, 1, C), np.linspace(0.5, 3, C)
    out, report = rewrite(model, {}, {}, running_stats={"bn": (new_mean, new_var)})
    check(out)
    assert report.recalibrated == ["bn"]
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    x = input_for(4)
    q = dict(p, mean=new_mean, var=new_var)
    assert np.allclose(run(out, {"x": x}), reference(x, q, 0.0, 0.0), atol=1e-5, rtol=1e-5)
    out2, report2 = rewrite(model, {"bn": 0.3}, {"bn": 0.3}, running_stats={"bn": (new_mean, new_var)})
    assert report2.rewritten == ["bn"]
    assert np.allclose(run(out2, {"x": x}), reference(x, q, 0.3, 0.3), atol=1e-4, rtol=1e-4)


def test_bad_coefficients_and_names() -> None:
    model, _ = bn_graph(4, 13)
    with pytest.raises(OnnxError, match="no BatchNormalization node named nope"):
        rewrite(model, {"nope": 0.1}, {})
    with pytest.raises(OnnxError, match=r"\[0, 1\]"):
        rewrite(model, {"bn": 1.5}, {})
    with pytest.raises(OnnxError, match="channels"):
        rewrite(model, {"bn": np.ones(C + 1) * 0.1}, {})


def test_folded_bn_graph_gives_the_clear_error() -> None:
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 8, 8])
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "conv.weight")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "conv.bias")
    conv = helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["c"], ["y"])
    model = helper.make_model(helper.make_graph([conv, relu], "g", [x], [y], [w, b]))
    with pytest.raises(NoBatchNormError) as e:
        rewrite(model, {}, {}, source="model.onnx")
    text = str(e.value)
    assert "model.onnx" in text and "folded" in text and "optimize=False" in text and "PRESERVE" in text
    with pytest.raises(NoBatchNormError, match="folded"):
        match_layers(model, ["layer1.0.bn1"])


def test_opset_too_old_is_refused() -> None:
    model, _ = bn_graph(4, 9)
    model.opset_import[0].version = 8
    layer = find_bn_nodes(model)[0]
    assert not layer.correctable and "opset 8" in layer.reason


# -------------------------------------------------------------------------------------------------- files


def test_external_data_round_trip(tmp_path: Path) -> None:
    model, p = bn_graph(4, 18, channels=300)  # 1.2 kB per parameter: above onnx's external-data threshold
    src = tmp_path / "big.onnx"
    save_onnx(model, src, external_data=True)
    assert (tmp_path / "big.onnx.data").is_file()
    loaded = load_onnx(src)
    beta = np.linspace(0.1, 0.9, 300)
    out, _ = rewrite(loaded, {"bn": 0.3}, {"bn": beta})
    dst = tmp_path / "out" / "corrected.onnx"
    dst.parent.mkdir()
    save_onnx(out, dst, external_data=True)
    assert (dst.parent / "corrected.onnx.data").is_file()
    assert sorted(q.name for q in dst.parent.iterdir()) == ["corrected.onnx", "corrected.onnx.data"]
    onnx.checker.check_model(str(dst), full_check=True)
    x = input_for(4, channels=300)
    assert np.allclose(run(dst, {"x": x}), reference(x, p, 0.3, beta), atol=1e-4, rtol=1e-4)
    assert out.graph.initializer[0].raw_data  # saving did not strip the caller's tensors


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model at all\xff" * 10)
    with pytest.raises(OnnxError, match=r"junk\.onnx"):
        load_onnx(junk)
    with pytest.raises(OnnxError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    model, _ = bn_graph(4, 18, channels=300)
    save_onnx(model, tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(OnnxError, match="external data"):
        load_onnx(tmp_path / "ext.onnx")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    model, _ = bn_graph(4, 18)
    target = tmp_path / "m.onnx"
    save_onnx(model, target)
    assert [q.name for q in tmp_path.iterdir()] == ["m.onnx"]
    assert load_onnx(target).SerializeToString() == model.SerializeToString()
    with pytest.raises(OnnxError, match="does not exist"):
        save_onnx(model, tmp_path / "nope" / "m.onnx")


# ----------------------------------------------------------------------------------------------- matching


def _two_layer_graph(names: tuple[str, str]) -> onnx.ModelProto:
    a, _ = bn_graph(4, 18, prefix=names[0], name="n0")
    b, _ = bn_graph(4, 18, prefix=names[1], name="n1", seed=5)
    bn_b = next(n for n in b.graph.node if n.op_type == "BatchNormalization")
    bn_b.input[0] = "out"
    bn_b.output[0] = "out2"
    a.graph.node.append(bn_b)
    a.graph.initializer.extend(b.graph.initializer)
    a.graph.output[0].name = "out2"
    return a


def test_match_by_parameter_names() -> None:
    model = _two_layer_graph(("layer1.0.bn1", "layer1.0.bn2"))
    layers = find_bn_nodes(model)
    assert [ly.torch_name for ly in layers] == ["layer1.0.bn1", "layer1.0.bn2"]
    assert match_layers(model, ["layer1.0.bn2", "layer1.0.bn1"]) == {
        "layer1.0.bn2": "n1",
        "layer1.0.bn1": "n0",
    }
    assert match_layers(model, ["n0"]) == {"n0": "n0"}
    # torch.export placeholder style names are matched with punctuation folded
    model2 = _two_layer_graph(("b_layer1_0_bn1", "b_layer2_0_bn1"))
    assert match_layers(model2, ["layer1.0.bn1"]) == {"layer1.0.bn1": "n0"}


def test_match_refuses_unknown_and_ambiguous_names() -> None:
    model = _two_layer_graph(("layer1.0.bn1", "layer1.0.bn2"))
    with pytest.raises(OnnxError, match=r"not found in the graph: layer9\.bn"):
        match_layers(model, ["layer9.bn"])
    shared = _two_layer_graph(("stem.bn", "stem.bn"))  # one module applied twice: two nodes, same params
    with pytest.raises(OnnxError, match=r"ambiguous: stem\.bn -> n0, n1"):
        match_layers(shared, ["stem.bn"])
    folded = _two_layer_graph(("a.b_c", "a_b.c"))  # distinct paths that fold to the same key
    with pytest.raises(OnnxError, match="ambiguous"):
        match_layers(folded, ["a_b_c"])
    assert match_layers(folded, ["a.b_c"]) == {"a.b_c": "n0"}


def test_bn_output_that_is_a_graph_output_keeps_its_name() -> None:
    model, p = bn_graph(4, 18)
    g = model.graph
    g.node.pop()  # drop the trailing Identity: the BN output "y" becomes the graph output
    g.output[0].name = "y"
    check(model)
    out, _ = rewrite(model, {"bn": 0.3}, {"bn": 0.3})
    check(out)
    assert [o.name for o in out.graph.output] == ["y"]
    x = input_for(4)
    assert np.allclose(run(out, {"x": x}, output="y"), reference(x, p, 0.3, 0.3), atol=1e-4, rtol=1e-4)

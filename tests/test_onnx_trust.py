"""Trust in the ONNX paths: inputs onnxruntime cannot handle are refused at load time, every written graph
is proven to load in onnxruntime, fp16 activations with fp32 BN parameters, IR < 4 graphs, broken BN
statistics, and ONNX export failures that say something short and true (bncorrect.onnx_rewrite,
bncorrect.onnx_export). Graphs are built in code with onnx.helper and run in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper
from torch import nn

from bncorrect.errors import _INTERFACE as INTERFACE
from bncorrect.errors import OnnxError
from bncorrect.onnx_export import ExportReport, export_onnx
from bncorrect.onnx_rewrite import (
    RUNTIME_NOT_WRITTEN,
    RUNTIME_OK,
    RewriteReport,
    find_bn_nodes,
    load_onnx,
    rewrite,
    save_onnx,
    tensor_problem,
)
from bncorrect.onnx_rewrite import _ort_max_opset as ort_max_opset
from bncorrect.onnx_rewrite import _ort_refusal as ort_refusal

from .reference import corrected_bn_reference

C = 4
EPS = 1e-3


def _params(seed: int = 0, c: int = C) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.standard_normal(c),
        "mean": rng.standard_normal(c) * 0.3,
        "var": rng.uniform(0.2, 2.0, c),
    }


def bn_model(
    opset: int = 17,
    *,
    params: dict[str, np.ndarray] | None = None,
    ir_version: int | None = None,
    initializers_as_inputs: bool = False,
    pre_op: tuple[str, str] = ("Relu", ""),
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (N, C, 5, 6) -> pre_op -> BatchNormalization(bn.weight, ...) -> Identity -> out; plus an unrelated
    initializer ``offset`` added to the output (it must survive every rewrite untouched)."""
    p = _params() if params is None else params
    names = {"scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
    inits = [numpy_helper.from_array(v.astype(np.float32), names[k]) for k, v in p.items()]
    inits.append(numpy_helper.from_array(np.array(0.5, dtype=np.float32), "offset"))
    op, domain = pre_op
    nodes = [
        helper.make_node(op, ["x"], ["h"], name="pre", domain=domain),
        helper.make_node("BatchNormalization", ["h", *(names[k] for k in p)], ["y"], name="bn", epsilon=EPS),
        helper.make_node("Add", ["y", "offset"], ["out"], name="add_offset"),
    ]
    shape = ["N", C, 5, 6]
    inputs = [helper.make_tensor_value_info("x", TP.FLOAT, shape)]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("out", TP.FLOAT, shape)], inits
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version if ir_version is not None else min(model.ir_version, 10)
    return model, p


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def x_input(seed: int = 1, batch: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, C, 5, 6)) * 1.3 + 0.4).astype(np.float32)


def expected(x: np.ndarray, p: dict[str, np.ndarray], alpha: float, beta: float) -> np.ndarray:
    h = np.maximum(x, 0).astype(np.float64)
    return corrected_bn_reference(h, p["mean"], p["var"], p["scale"], p["bias"], EPS, alpha, beta) + 0.5


def only(folder: Path) -> list[str]:
    return sorted(q.name for q in folder.iterdir())


# ---------------------------------------------------------------------- 1. refused before any pass


def test_opset_newer_than_onnx_and_onnxruntime_know_is_refused_at_load(tmp_path: Path, cli) -> None:
    model, _ = bn_model()
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxError) as info:
        load_onnx(path)
    text = str(info.value)
    assert "future.onnx" in text and "opset 99" in text
    assert "opset_version=" in info.value.hint  # the fix: re-export with an opset this installation runs
    out = tmp_path / "out.onnx"
    result = cli("weight", path, "--alpha", "0.1", "-o", out)
    assert result.code != 0 and "opset 99" in result.out + result.err
    assert not out.exists() and only(tmp_path) == ["future.onnx"]


def test_ir_version_onnxruntime_cannot_load_is_refused(tmp_path: Path) -> None:
    model, _ = bn_model()
    model.ir_version = 99
    path = tmp_path / "ir99.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxError, match=r"ir99\.onnx.*IR version 99"):
        load_onnx(path)


def test_onnxruntime_opset_limit_is_probed_exactly() -> None:
    top = ort_max_opset(10, 200)
    assert top >= 17  # every onnxruntime bncorrect supports runs opset 17
    assert ort_refusal(10, top) is None
    refusal = ort_refusal(10, top + 1)
    assert refusal is not None and str(top + 1) in refusal and "[ONNXRuntimeError]" not in refusal


def _with_tensor(model: onnx.ModelProto, tensor: TP) -> onnx.ModelProto:
    model.graph.initializer.append(tensor)
    return model


def test_initializer_dims_that_do_not_fit_the_data_are_refused(tmp_path: Path) -> None:
    huge = TP(name="huge", data_type=TP.FLOAT, dims=[2**20, 2**20], raw_data=b"\0" * 16)
    negative = TP(name="negative", data_type=TP.FLOAT, dims=[-1, 4], raw_data=b"\0" * 16)
    typed = helper.make_tensor("typed", TP.FLOAT, [3, 3], [1.0] * 9)
    del typed.float_data[4:]
    for tensor, words in ((huge, "16 bytes"), (negative, "negative dimension"), (typed, "float_data")):
        model, _ = bn_model()
        path = tmp_path / f"{tensor.name}.onnx"
        onnx.save(_with_tensor(model, tensor), path)
        with pytest.raises(OnnxError) as info:
            load_onnx(path)
        text = str(info.value)
        assert path.name in text and repr(tensor.name) in text and words in text, text
        assert "again" in info.value.hint


def test_constant_node_tensor_that_does_not_fit_its_dims_is_refused(tmp_path: Path) -> None:
    model, _ = bn_model()
    bad = TP(name="c", data_type=TP.FLOAT16, dims=[8], raw_data=b"\0" * 4)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], name="const_bad", value=bad))
    path = tmp_path / "const.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxError, match=r"const\.onnx.*Constant node 'const_bad'.*4 bytes"):
        load_onnx(path)


def test_consistent_tensors_pass_and_unloaded_external_data_is_not_checked(tmp_path: Path) -> None:
    assert tensor_problem(numpy_helper.from_array(np.zeros((2, 3), np.float16), "ok")) is None
    assert tensor_problem(helper.make_tensor("s", TP.FLOAT, [2], [1.0, 2.0])) is None
    assert tensor_problem(numpy_helper.from_array(np.zeros((0, 5), np.float32), "empty")) is None
    assert tensor_problem(helper.make_tensor("str", TP.STRING, [2], [b"a", b"b"])) is None
    model, _ = bn_model(params=_params(c=C))
    big = numpy_helper.from_array(np.ones((64, 64), np.float32), "big")
    model.graph.initializer.append(big)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    lazy = onnx.load(path, load_external_data=False)
    ext = next(t for t in lazy.graph.initializer if t.name == "big")
    assert ext.data_location == TP.EXTERNAL and tensor_problem(ext) is None
    loaded = load_onnx(path)  # loaded external data is checked, and fits
    assert next(t for t in loaded.graph.initializer if t.name == "big").raw_data


# ---------------------------------------------------------------------- 2. written graphs load in ORT


def test_saved_rewrite_is_proven_to_load_and_recorded(tmp_path: Path) -> None:
    model, p = bn_model()
    out, report = rewrite(model, {"bn": 0.3}, {"bn": 0.2})
    assert report.runtime_check == RUNTIME_NOT_WRITTEN
    target = tmp_path / "out.onnx"
    save_onnx(out, target, report=report)
    assert report.runtime_check == RUNTIME_OK == "onnxruntime loads it"
    assert report.summary()["runtime_check"] == RUNTIME_OK
    x = x_input()
    got = session(target).run(["out"], {"x": x})[0]
    np.testing.assert_allclose(got, expected(x, p, 0.3, 0.2), rtol=1e-4, atol=1e-4)


def test_graph_onnxruntime_refuses_is_not_written(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model, _ = bn_model()
    # Add of a float tensor and a double initializer: onnx.save accepts it, onnxruntime does not.
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array(0.5), "offset"))
    report = RewriteReport()
    target = tmp_path / "bad.onnx"
    with pytest.raises(OnnxError) as info:
        save_onnx(model, target, report=report)
    text = str(info.value)
    assert "bad.onnx" in text and "onnxruntime" in text and "nothing was written" in text
    assert "[ONNXRuntimeError]" not in info.value.message
    assert only(tmp_path) == []  # neither OUT nor the staged file
    assert report.runtime_check == RUNTIME_NOT_WRITTEN
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # the library never prints, onnxruntime neither


def test_custom_domain_op_of_the_input_is_recorded_as_not_checked(tmp_path: Path) -> None:
    model, _ = bn_model(pre_op=("MyRelu", "com.example"))
    out, report = rewrite(model, {"bn": 0.3}, {"bn": 0.3})
    target = tmp_path / "custom.onnx"
    save_onnx(out, target, report=report)
    assert target.exists()
    assert report.runtime_check.startswith("not checked: ")
    assert "MyRelu" in report.runtime_check and "com.example" in report.runtime_check


def test_save_without_runtime_check_records_nothing(tmp_path: Path) -> None:
    model, _ = bn_model()
    report = RewriteReport()
    save_onnx(model, tmp_path / "m.onnx", check_runtime=False, report=report)
    assert report.runtime_check == RUNTIME_NOT_WRITTEN


# ------------------------------------------------------- 3. fp16 activations with fp32 BN parameters


def conv_fp16_bn_fp32(opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (fp16) -> Conv (fp16 weights) -> BatchNormalization (fp32 scale/bias/mean/var) -> y (fp16), with no
    value_info: the BN input's type is only known through shape inference."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((C, 3, 3, 3)) * 0.4).astype(np.float16)
    p = _params(seed=4)
    p["mean"] = p["mean"] + 0.2
    names = {k: f"bn.{k}" for k in p}
    inits = [numpy_helper.from_array(w, "conv.weight")]
    inits += [numpy_helper.from_array(v.astype(np.float32), names[k]) for k, v in p.items()]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h", *names.values()], ["y"], name="bn", epsilon=EPS),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT16, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TP.FLOAT16, None)],  # no shape, no value_info anywhere
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model, p


@pytest.mark.parametrize("opset", [15, 17])
def test_fp16_activations_with_fp32_parameters(tmp_path: Path, opset: int) -> None:
    model, p = conv_fp16_bn_fp32(opset)
    assert not model.graph.value_info
    (layer,) = find_bn_nodes(model)
    assert layer.correctable and layer.dtype == "float16"
    out, report = rewrite(model, {"bn": 0.1}, {"bn": 0.1})
    assert report.rewritten == ["bn"]
    target = tmp_path / "fp16.onnx"
    save_onnx(out, target, report=report)
    assert report.runtime_check == RUNTIME_OK
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float16)
    # the BN input as the graph computes it (fp16 Conv), read from the original graph
    tap = onnx.ModelProto()
    tap.CopyFrom(model)
    tap.graph.output.append(helper.make_tensor_value_info("h", TP.FLOAT16, None))
    h = session(tap).run(["h"], {"x": x})[0]
    got = session(target).run(["y"], {"x": x})[0]
    assert got.dtype == np.float16
    ref = corrected_bn_reference(
        h.astype(np.float32), p["mean"], p["var"], p["scale"], p["bias"], EPS, 0.1, 0.1
    )
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= 1e-2 * np.abs(ref).max(), err
    # alpha = 0 keeps the BatchNormalization node
    same, kept = rewrite(model, {"bn": 0.0}, {"bn": 0.0})
    assert kept.kept == ["bn"] and kept.rewritten == []
    assert [n.op_type for n in same.graph.node] == ["Conv", "BatchNormalization"]


# ---------------------------------------------------------------------------------- 4. IR < 4 graphs


def _check_inputs(model: onnx.ModelProto) -> None:
    """Every graph input is used by a node, and no constant bncorrect added is feedable."""
    used = {i for n in model.graph.node for i in n.input}
    names = [v.name for v in model.graph.input]
    assert all(name in used for name in names), names
    assert not any("bncorrect" in name for name in names), names


@pytest.mark.parametrize("opset", [9, 13])
def test_ir3_graph_keeps_its_inputs_consistent(tmp_path: Path, opset: int) -> None:
    model, p = bn_model(opset, ir_version=3, initializers_as_inputs=True)
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite(model, {"bn": 0.3}, {"bn": 0.2})
    assert report.rewritten == ["bn"] and out.ir_version == 3
    onnx.checker.check_model(out, full_check=True)  # IR 3: every initializer is a graph input
    _check_inputs(out)
    assert [v.name for v in out.graph.input] == ["x", "offset"]  # the consumed BN parameters are gone
    target = tmp_path / "ir3.onnx"
    save_onnx(out, target, report=report)
    assert report.runtime_check == RUNTIME_OK
    x = x_input()
    sess = session(target)
    got = sess.run(["out"], {"x": x})[0]
    np.testing.assert_allclose(got, expected(x, p, 0.3, 0.2), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match=r"bn\.running_mean"):  # feeding a consumed parameter is an error
        sess.run(["out"], {"x": x, "bn.running_mean": p["mean"].astype(np.float32)})


def test_ir3_recalibrated_statistics_are_not_feedable(tmp_path: Path) -> None:
    model, p = bn_model(9, ir_version=3, initializers_as_inputs=True)
    mean, var = p["mean"] + 0.5, p["var"] * 2
    out, report = rewrite(model, {}, {}, running_stats={"bn": (mean, var)})
    assert report.recalibrated == ["bn"]
    onnx.checker.check_model(out, full_check=True)
    _check_inputs(out)
    assert [v.name for v in out.graph.input] == ["x", "bn.weight", "bn.bias", "offset"]
    x = x_input()
    got = session(out).run(["out"], {"x": x})[0]
    new = {**p, "mean": mean, "var": var}
    np.testing.assert_allclose(got, expected(x, new, 0.0, 0.0), rtol=1e-4, atol=1e-4)


def test_overridable_bn_parameters_of_later_ir_versions_are_not_left_as_inputs() -> None:
    model, p = bn_model(17, initializers_as_inputs=True)
    out, _ = rewrite(model, {"bn": 0.3}, {"bn": 0.3})
    onnx.checker.check_model(out, full_check=True)
    _check_inputs(out)
    assert [v.name for v in out.graph.input] == ["x", "offset"]
    x = x_input()
    got = session(out).run(["out"], {"x": x})[0]
    np.testing.assert_allclose(got, expected(x, p, 0.3, 0.3), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- 5. broken BN statistics


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("var", np.nan, "running_var is NaN in channel 2"),
        ("var", -1.0, "running_var is negative in channel 2"),
        ("mean", np.inf, "running_mean is infinite in channel 2"),
        ("scale", np.nan, "weight is NaN in channel 2"),
    ],
)
def test_broken_statistics_are_exposed_per_layer(key: str, value: float, words: str) -> None:
    p = _params()
    p[key][2] = value
    model, _ = bn_model(params=p)
    (layer,) = find_bn_nodes(model)
    assert not layer.correctable
    assert layer.stats_problem == layer.reason == words
    assert layer.summary()["stats_problem"] == words
    _, report = rewrite(model, {"bn": 0.3}, {"bn": 0.3})
    assert report.skipped == [("bn", words)]


def test_healthy_layer_and_other_reasons_have_no_stats_problem() -> None:
    model, _ = bn_model()
    (layer,) = find_bn_nodes(model)
    assert layer.correctable and layer.stats_problem is None
    assert "stats_problem" in layer.summary() and layer.summary()["stats_problem"] is None
    training = helper.make_attribute("training_mode", 1)
    model.graph.node[1].attribute.append(training)
    (layer,) = find_bn_nodes(model)
    assert not layer.correctable and "training" in layer.reason and layer.stats_problem is None


# --------------------------------------------------------------------------------- 6. ONNX export


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot trace it, the TorchScript tracer can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y * 2
        return y


class NoOnnxOp(nn.Module):
    """An operator neither torch.onnx exporter can write (eigvalsh)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).flatten(2)
        return torch.linalg.eigvalsh(y @ y.transpose(1, 2))


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()


def test_export_failure_is_one_true_line_and_prints_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    target = tmp_path / "eig.onnx"
    with pytest.raises(OnnxError) as info:
        export_onnx(NoOnnxOp().eval(), torch.randn(2, 3, 8, 8), target)
    e = info.value
    assert "\n" not in e.message and "\x1b" not in e.message and len(e.message) < 450
    assert e.message.startswith("torch.onnx.export failed:") and "eigh" in e.message
    assert "no-dynamic-batch" not in str(e)
    assert "neither of torch.onnx's exporters" in e.hint and "bncorrect apply" in e.hint
    assert e.detail and "\x1b" not in e.detail and "Traceback" in e.detail
    assert "the TorchScript exporter failed too" in e.detail  # both logs went to the detail
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert only(tmp_path) == []


def test_traced_export_prints_nothing_and_says_how_it_was_made(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    target = tmp_path / "dd.onnx"
    report = export_onnx(DataDependent().eval(), torch.randn(2, 3, 8, 8), target)
    (note,) = report.notes
    assert "TorchScript exporter" in note and "tracer fixed" in note
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert only(tmp_path) == ["dd.onnx"]


def test_export_on_a_wrong_input_shape_names_the_channels(tmp_path: Path) -> None:
    target = tmp_path / "shape.onnx"
    token = INTERFACE.set("cli")  # hints as the command line spells them
    try:
        with pytest.raises(OnnxError) as info:
            export_onnx(plain_net(), torch.randn(1, 1, 8, 8), target)
    finally:
        INTERFACE.reset(token)
    e = info.value
    assert "cannot run on an input of shape (1, 1, 8, 8)" in e.message and "3 channels" in e.message
    assert "--input-shape 1,3,8,8" in e.hint
    with pytest.raises(OnnxError) as info:  # the Python API names its own way of passing the shape
        export_onnx(plain_net(), torch.randn(1, 1, 8, 8), target)
    assert "(1, 3, 8, 8)" in info.value.hint and "--" not in info.value.hint
    assert only(tmp_path) == []


def test_export_success_is_silent_and_records_the_runtime_check(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    target = tmp_path / "net.onnx"
    report = export_onnx(plain_net(), torch.randn(2, 3, 8, 8), target, verify=False)
    assert isinstance(report, ExportReport) and target.exists()
    assert report.runtime_check == RUNTIME_OK and report.summary()["runtime_check"] == RUNTIME_OK
    assert report.rewrite is not None and report.rewrite.runtime_check == RUNTIME_OK
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""

"""Mirrors of what real torchvision/timm/detection models bring, built in code (torchvision cannot be
installed beside this torch build; scripts/zoo.py runs the real families by hand): a FrozenBatchNorm2d
backbone, a BatchNormAct2d-style subclass, a detector returning a list of dicts, a two-input model fed dict
batches through ``forward_fn``; and the Python API fed data in every form people use."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bncorrect
from bncorrect.api import ExportOptions
from bncorrect.errors import OnnxError
from bncorrect.layers import correct_model, find_norm_layers

from . import toys
from .reference import corrected_bn_reference


def _capture_inputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_frozen_bn_and_bn_act_are_found_and_corrected_exactly():
    model = toys.frozen_backbone(seed=0)
    layers = {ly.name: ly for ly in find_norm_layers(model)}
    assert {n: ly.type for n, ly in layers.items()} == {
        "1": "FrozenBatchNorm2d",
        "4": "FrozenBatchNorm2d",
        "7": "BatchNormAct2d",
    }
    assert all(ly.correctable and ly.strategy == "through-forward" for ly in layers.values())
    x, _ = toys.data(6, seed=2)
    with torch.no_grad():
        plain_out = model(x)
    inputs = _capture_inputs(model, list(layers), x)
    corrected = correct_model(toys.frozen_backbone(seed=0), 0.3, 0.2)
    with torch.no_grad():
        assert torch.equal(correct_model(toys.frozen_backbone(seed=0), 0.0, 0.0)(x), plain_out)
        for name in ("1", "4"):  # FrozenBN: the corrected layer against the float64 reference
            bn = model.get_submodule(name)
            want = corrected_bn_reference(
                inputs[name].numpy(),
                bn.running_mean.double().numpy(),
                bn.running_var.double().numpy(),
                bn.weight.double().numpy(),
                bn.bias.double().numpy(),
                bn.eps,
                0.3,
                0.2,
            )
            got = corrected.get_submodule(name)(inputs[name])
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=3e-5)
        # BatchNormAct2d: the activation survives the correction
        bn = model.get_submodule("7")
        want = corrected_bn_reference(
            inputs["7"].numpy(),
            bn.running_mean.double().numpy(),
            bn.running_var.double().numpy(),
            bn.weight.detach().double().numpy(),
            bn.bias.detach().double().numpy(),
            bn.eps,
            0.3,
            0.2,
        )
        got = corrected.get_submodule("7")(inputs["7"])
        np.testing.assert_allclose(got.numpy(), np.maximum(want, 0.0), rtol=1e-4, atol=3e-5)


def test_frozen_bn_backbone_exports_as_corrected_onnx(tmp_path):
    out = tmp_path / "frozen.onnx"
    outcome = bncorrect.weight(
        toys.frozen_backbone(seed=0), 0.25, out=out, export=ExportOptions(input_shape=(2, 3, 8, 8))
    )
    export = outcome.report["export"]
    assert sorted(export.rewritten) and len(export.rewritten) == 3  # both FrozenBN and the BN-act layer
    assert export.max_abs_diff is not None and export.max_abs_diff < 1e-4
    graph = onnx.load(out)
    assert not [
        n for n in graph.graph.node if n.op_type == "BatchNormalization" and "bncorrect" not in n.name
    ]
    x, _ = toys.data(5, seed=4)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = correct_model(toys.frozen_backbone(seed=0), 0.25, 0.25)(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_detector_returning_lists_estimate_recalibrate_apply_diagnose(tmp_path):
    det = toys.tiny_detector(seed=0)
    x, _ = toys.data(24, seed=5)
    est = bncorrect.estimate(det, x, 2, out=tmp_path / "det.safetensors")
    assert set(est.corrections.layers) == {"backbone.1", "backbone.4", "backbone.7"}
    assert all(0.0 <= float(lc.alpha) <= 1.0 for lc in est.corrections.layers.values())
    rec = bncorrect.recalibrate(det, x, out=tmp_path / "rec.safetensors")
    with torch.no_grad():  # the first FrozenBN's new statistics are its input's over all the data
        h = det.backbone[0](x)
    torch.testing.assert_close(rec.corrections.layers["backbone.1"].running_mean, h.mean((0, 2, 3)))
    applied = bncorrect.apply(det, tmp_path / "det.safetensors")
    with torch.no_grad():
        outputs = applied.model(x[:2])
    assert isinstance(outputs, list) and set(outputs[0]) == {"boxes", "scores"}
    diag = bncorrect.api.diagnose(det, x, 2, corrections=tmp_path / "det.safetensors")
    assert [ly.name for ly in diag.layers] == ["backbone.1", "backbone.4", "backbone.7"]


def test_export_failure_keeps_the_corrections(tmp_path):
    """When torch.onnx cannot export the model, the corrections of the pass are written first."""

    class Unexportable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = toys.conv_net(seed=0)[:3]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.net(x).flatten(2)
            return torch.linalg.eigvalsh(y @ y.transpose(1, 2))  # no ONNX op for eigh

    x, _ = toys.data(16, seed=6)
    out = tmp_path / "u.onnx"
    with pytest.raises(OnnxError) as info:
        bncorrect.estimate(Unexportable().eval(), x, 2, out=out)
    saved = tmp_path / "u.safetensors"
    assert str(saved) in str(info.value) and "bncorrect apply" in str(info.value)
    assert not out.exists()
    corr = bncorrect.load_corrections(saved)
    assert set(corr.layers) == {"net.1"} and corr.method == "evalnorm-offline"
    saved.unlink()
    with pytest.raises(OnnxError) as info:  # a recalibration pass is kept the same way
        bncorrect.recalibrate(Unexportable().eval(), x, out=out)
    assert str(saved) in str(info.value) and not out.exists()
    corr = bncorrect.load_corrections(saved)
    with torch.no_grad():
        h = Unexportable().net[0](x)
    torch.testing.assert_close(corr.layers["net.1"].running_mean, h.mean((0, 2, 3)))
    assert corr.method == "recalibrate-eval"


def test_two_input_model_with_dict_batches_and_forward_fn():
    x, _ = toys.data(32, seed=7)
    batches = [{"image": x[i : i + 8], "extra": torch.zeros(8, 5)} for i in range(0, 32, 8)]
    two = toys.TwoInputNet(seed=0).eval()
    got = bncorrect.estimate(two, batches, 2, forward_fn=lambda m, b: m(b["image"], b["extra"]))
    same = bncorrect.estimate(toys.conv_net(seed=0), [(b["image"],) for b in batches], 2)
    a = {
        n.removeprefix("body."): (float(lc.alpha), float(lc.beta)) for n, lc in got.corrections.layers.items()
    }
    b = {n: (float(lc.alpha), float(lc.beta)) for n, lc in same.corrections.layers.items()}
    assert a == b


def _alphas(outcome) -> dict[str, float]:
    return {n: float(lc.alpha) for n, lc in outcome.corrections.layers.items()}


def test_the_api_takes_data_as_people_pass_it(tmp_path):
    model = toys.conv_net(seed=0)
    x, y = toys.data(64, seed=8)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    reference = _alphas(bncorrect.estimate(model, tmp_path / "d.npz", 2, seed=3))
    for data in (x, x.numpy(), (x, y), (x,), bncorrect.data.from_arrays(x, y), TensorDataset(x, y)):
        assert _alphas(bncorrect.estimate(model, data, 2, seed=3)) == reference, type(data)
    # a shuffling DataLoader and a plain iterable of batches are used as they are
    loader = DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(_alphas(bncorrect.estimate(model, loader, 2))) == set(reference)
    with pytest.warns(UserWarning, match="shuffle=True"):
        bncorrect.estimate(model, DataLoader(TensorDataset(x, y), batch_size=16), 2)
    sweep = bncorrect.api.sweep_alpha(model, (x, y), alphas=[0.0, 0.1])
    assert sweep.report["sweep"].n_examples == 64
    with pytest.raises(bncorrect.BncorrectError, match="cannot read data"):
        bncorrect.estimate(model, 42, 2)


def test_progress_false_true_and_callable(capsys):
    model = toys.conv_net(seed=0)
    x, _ = toys.data(16, seed=9)
    calls = []
    bncorrect.estimate(model, x, 2, progress=lambda d, c, t: calls.append((d, c, t)))
    passes = [c for c in calls if c[0] == "estimate"]
    assert passes and passes[-1][1] == passes[-1][2] == 16
    # the grid solves after the pass report too, one step per layer
    n_layers = len(bncorrect.find_norm_layers(model))
    assert calls[-1] == ("solve alpha/beta", n_layers, n_layers) and calls.index(passes[-1]) < len(calls) - 1
    bncorrect.estimate(model, x, 2, progress=False)
    bncorrect.recalibrate(model, x, progress=True)
    assert "recalibrate" in capsys.readouterr().err
    with pytest.raises(bncorrect.BncorrectError, match="progress must be"):
        bncorrect.estimate(model, x, 2, progress="yes")


def test_a_module_passed_in_saves_as_a_safe_checkpoint_when_its_class_rebuilds(tmp_path):
    x, _ = toys.data(4, seed=10)
    two = toys.TwoInputNet(seed=3).eval()
    out = tmp_path / "two.pt"
    bncorrect.weight(two, 0.1, out=out)
    obj = torch.load(out, weights_only=True)  # no pickled code
    assert obj["arch"] == f"{toys.TwoInputNet.__module__}:TwoInputNet"
    back = bncorrect.load(out, arch=obj["arch"])
    with torch.no_grad():
        want = correct_model(toys.TwoInputNet(seed=3).eval(), 0.1)(x, torch.zeros(4, 5))
        torch.testing.assert_close(back(x, torch.zeros(4, 5)), want)
    # a Sequential built by a function cannot be rebuilt from its class: it stays a pickle
    seq = tmp_path / "seq.pt"
    bncorrect.weight(toys.conv_net(seed=0), 0.1, out=seq)
    with pytest.raises(bncorrect.BncorrectError, match="trust_pickle"):
        bncorrect.load(seq)
    assert isinstance(bncorrect.load(seq, trust_pickle=True), torch.nn.Module)


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    """The README's Python blocks, executed in order after the tour commands they refer to."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_checkpoints").symlink_to(root / "sample_checkpoints")
    m, d = "sample_checkpoints/mnist1d_b2/model.pt", "sample_checkpoints/mnist1d_b2/val.npz"
    subprocess.run(
        [sys.executable, "-m", "bncorrect", "estimate", m, "--data", d, "-B", "2", "-o", "evalnorm.pt"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "-m", "bncorrect", "demo", "--fast", "--dataset", "digits", "-B", "2"],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    namespace: dict[str, object] = {}
    runnable = [b for b in blocks if "bncorrect.load(" in b or "InferenceSession(" in b]
    assert len(runnable) == 2
    for block in runnable:
        exec(compile(block, "README.md", "exec"), namespace)

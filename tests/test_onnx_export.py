"""Export of corrected PyTorch models to ONNX, verification, cross-format apply and --min-effect
(bncorrect.onnx_export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bncorrect import api, onnx_export
from bncorrect.corrections import Corrections, LayerCorrection, load_corrections, save_corrections
from bncorrect.errors import UsageError, VerificationError
from bncorrect.layers import correct_model
from bncorrect.onnx_export import export_onnx, export_plain, min_effect_filter, run_onnx, verify_onnx
from bncorrect.onnx_rewrite import find_bn_nodes, load_onnx, match_layers, rewrite

from .reference import corrected_bn_reference


class Net(nn.Module):
    """Conv2d+BN+ReLU blocks, BatchNorm1d on (N, C, L) and on (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.mix = nn.Conv1d(8, 6, 1)
        self.bn1d = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5, bias=False)
        self.head = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x).flatten(2)
        y = torch.relu(self.bn1d(self.mix(y)))
        return self.head(self.fc(y.mean(2)))


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(8, 3, 6, 6) * 2 + 1)
    return net.eval()


ALPHA = {"features.1": 0.3, "features.4": torch.linspace(0.1, 0.8, 8), "bn1d": 0.5, "head": 0.2}
BETA = {"features.1": 0.1, "features.4": 0.4, "bn1d": torch.linspace(0.9, 0.2, 6), "head": 0.7}


@pytest.fixture(scope="module")
def corrected() -> Net:
    return correct_model(trained_net(), ALPHA, BETA)


@pytest.fixture(scope="module")
def exported(
    corrected: Net, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, onnx_export.ExportReport]:
    path = tmp_path_factory.mktemp("export") / "net.onnx"
    return path, export_onnx(corrected, torch.randn(1, 3, 6, 6), path)


def test_export_verifies_and_rewrites_every_corrected_layer(exported, corrected: Net) -> None:
    path, report = exported
    assert report.path == path and path.is_file()
    assert report.max_abs_diff is not None and report.rel_diff is not None and report.rel_diff <= 1e-4
    assert sorted(report.rewritten) == sorted(ALPHA)
    model = load_onnx(path)
    onnx.checker.check_model(model, full_check=True)
    assert find_bn_nodes(model) == []  # every BN rewritten
    # dynamic batch: another batch size runs and matches PyTorch
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        ref = corrected(x).numpy()
    got = run_onnx(path, x)[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert verify_onnx(path, corrected, x) <= 1e-4 * np.abs(ref).max()
    assert not [p for p in path.parent.iterdir() if p.name != "net.onnx"]  # no temp files left


def test_export_does_not_touch_the_callers_model(corrected: Net) -> None:
    from bncorrect.layers import CorrectedNorm

    assert isinstance(corrected.features[1], CorrectedNorm) and not corrected.training


def test_export_older_opset_and_identity_layers(tmp_path: Path) -> None:
    net = correct_model(
        trained_net(1), {"features.1": 0.4, "features.4": 0.0, "bn1d": 0.0, "head": 0.3}, None
    )
    report = export_onnx(net, torch.randn(2, 3, 6, 6), tmp_path / "net13.onnx", opset=13)
    assert report.opset == 13 and report.rel_diff is not None and report.rel_diff <= 1e-4
    assert sorted(report.rewritten) == ["features.1", "head"] and sorted(report.kept) == [
        "bn1d",
        "features.4",
    ]
    model = load_onnx(tmp_path / "net13.onnx")
    assert sorted(ly.torch_name for ly in find_bn_nodes(model)) == [
        "bn1d",
        "features.4",
    ]  # plain BN, foldable


def test_verification_failure_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = correct_model(trained_net(2), 0.3)
    monkeypatch.setattr(onnx_export, "_compare", lambda *a, **k: (1.0, 0.5))
    with pytest.raises(VerificationError, match="nothing was written"):
        export_onnx(net, torch.randn(2, 3, 6, 6), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_verify_onnx_detects_a_different_model(exported) -> None:
    path, _ = exported
    other = correct_model(trained_net(3), 0.9)
    with pytest.raises(VerificationError, match="differs"):
        verify_onnx(path, other, torch.randn(2, 3, 6, 6))


def test_cross_format_apply_round_trip(tmp_path: Path) -> None:
    """Corrections estimated on the PyTorch model, applied to that model's ONNX export."""
    net = trained_net(4)
    corrections = Corrections(
        layers={
            "features.1": LayerCorrection(torch.tensor(0.25), torch.tensor(0.5)),
            "features.4": LayerCorrection(torch.linspace(0, 1, 8), torch.tensor(0.3)),
            "head": LayerCorrection(torch.tensor(0.6), torch.tensor(0.1)),
        },
        method="test",
    )
    save_corrections(corrections, tmp_path / "c.safetensors")
    graph = export_plain(net, torch.randn(1, 3, 6, 6))  # what a user exports with BN kept
    loaded = load_corrections(tmp_path / "c.safetensors")
    mapping = match_layers(graph, list(loaded.layers))
    assert set(mapping) == {"features.1", "features.4", "head"}
    alpha, beta = loaded.coefficients()
    out, report = rewrite(
        graph, {mapping[k]: v for k, v in alpha.items()}, {mapping[k]: v for k, v in beta.items()}
    )
    assert sorted(report.rewritten) == sorted(mapping.values())
    assert len(report.kept) == 1  # bn1d: not in the file
    reference = correct_model(trained_net(4), *[{k: v for k, v in d.items()} for d in loaded.coefficients()])
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        ref = reference(x).numpy()
    assert np.abs(run_onnx(out, x)[0] - ref).max() <= 1e-4 * np.abs(ref).max()


class FrozenBN(nn.Module):
    """torchvision-style FrozenBatchNorm2d: exports as Mul/Add, not as a BN node."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for k, v in (
            ("weight", torch.ones(c)),
            ("bias", torch.zeros(c)),
            ("running_mean", torch.zeros(c)),
            ("running_var", torch.ones(c)),
        ):
            self.register_buffer(k, v)
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_frozen_bn_exports_as_a_corrected_node(tmp_path: Path) -> None:
    """A BN-like layer that is not a _BatchNorm (FrozenBatchNorm2d) is exported as BatchNormalization and
    rewritten like any other (it used to export as Mul/Add and be refused)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), FrozenBN(4)).eval()
    correct_model(net, 0.2)
    report = export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "f.onnx")
    assert sorted(report.rewritten) == ["1", "3"]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4


def test_min_effect_keeps_layers_whose_correction_is_negligible() -> None:
    net = trained_net(5)
    graph = export_plain(net, torch.randn(1, 3, 6, 6))
    names = {ly.torch_name: ly.name for ly in find_bn_nodes(graph)}
    alpha = {names["features.1"]: 1e-7, names["features.4"]: 0.5, names["head"]: 0.4}
    report = min_effect_filter(graph, alpha, alpha, torch.randn(8, 3, 6, 6), tol=1e-3)
    assert report.kept == [names["features.1"]]
    assert sorted(report.corrected) == sorted([names["features.4"], names["head"]])
    assert report.effects[names["features.1"]] < 1e-3 < report.effects[names["features.4"]]
    _out, rep = rewrite(graph, report.filter(alpha), report.filter(alpha))
    assert names["features.1"] in rep.kept and len(rep.rewritten) == 2


def _layer_effects(net: nn.Module, x: torch.Tensor, a: float) -> dict[str, float]:
    """Per BN layer: max|corrected - plain| / RMS(plain) of its output, its input from the plain model."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0]))
        for n, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        net.eval()(x)
        for h in hooks:
            h.remove()
        effects = {}
        for n, xin in inputs.items():
            bn = net.get_submodule(n)
            plain = bn(xin)
            stats = [t.double().numpy() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
            corr = torch.from_numpy(corrected_bn_reference(xin.double().numpy(), *stats, bn.eps, a, a))
            plain = plain.double()
            effects[n] = float((corr - plain).abs().max() / plain.pow(2).mean().sqrt())
    return effects


def _plain_bn_layers(path: Path) -> list[str]:
    """The PyTorch names of the layers still computed by a BatchNormalization node."""
    graph = load_onnx(path)
    return sorted(ly.torch_name for ly in find_bn_nodes(graph))


def test_min_effect_on_export_keeps_exactly_the_negligible_layers(tmp_path: Path) -> None:
    net = trained_net(5)
    x = torch.randn(32, 3, 6, 6)
    effects = _layer_effects(net, x, 0.3)
    tol = sorted(effects.values())[1] * 1.0001  # the two smallest effects fall below it
    out = tmp_path / "w.onnx"
    outcome = api.weight(net, 0.3, out=out, export=api.ExportOptions(min_effect=tol, example_input=x))
    report = outcome.report["export"]
    kept = sorted(n for n, e in effects.items() if e < tol)
    assert len(kept) == 2 and _plain_bn_layers(out) == kept
    assert report.max_abs_diff < 1e-4  # verified against the model with those layers plain too
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert sorted(report.rewritten) == sorted(set(effects) - set(kept))
    assert len(report.min_effect.kept) == 2


def test_min_effect_needs_data(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="min-effect"):
        api.weight(
            trained_net(5),
            0.3,
            out=tmp_path / "w.onnx",
            export=api.ExportOptions(min_effect=0.01, input_shape=(1, 3, 6, 6)),
        )
    assert not (tmp_path / "w.onnx").exists()


@pytest.mark.parametrize(("tol", "all_kept"), [(1e9, True), (0.0, False)])
def test_cli_estimate_min_effect(tmp_path: Path, cli, tol: float, all_kept: bool) -> None:
    net = trained_net(5)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    np.savez(tmp_path / "d.npz", x=torch.randn(64, 3, 6, 6).numpy())
    out = tmp_path / "e.onnx"
    arch = "tests.test_onnx_export:trained_net"
    res = cli(
        "estimate",
        tmp_path / "m.pt",
        "--arch",
        arch,
        "--data",
        tmp_path / "d.npz",
        "-B",
        4,
        "-o",
        out,
        "--min-effect",
        tol,
        "--json",
    )
    assert res.code == 0, res.err
    report = json.loads(res.out)["min_effect"]
    names = sorted(n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert _plain_bn_layers(out) == (names if all_kept else [])
    assert len(report["kept"]) == (len(names) if all_kept else 0)


def test_dict_outputs_keep_their_names(tmp_path: Path) -> None:
    """A model returning {"out": ..., "aux": ...} (torchvision segmentation) gives graph outputs named
    out and aux, so --output-key out selects the same tensor in PyTorch and in the graph."""

    class Seg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.head, self.aux = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = torch.relu(self.bn(self.conv(x)))
            return {"out": self.head(y), "aux": self.aux(y)}

    net = correct_model(Seg().eval(), 0.2)
    export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "seg.onnx")
    graph = onnx.load(tmp_path / "seg.onnx")
    assert [o.name for o in graph.graph.output] == ["out", "aux"]


class Branchy(nn.Module):
    """Data-dependent Python control flow: torch.export cannot capture it, the TorchScript tracer can
    (for the example input's branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            self.bn.running_var.copy_(torch.tensor([0.5, 1.5, 2.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if h.sum() > -1e9:  # always taken, but a branch on a tensor's value
            return torch.relu(h)
        return h


def test_torchscript_exporter_stands_in_when_torch_export_fails(tmp_path):
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3, 6, 6)
    out = tmp_path / "b.onnx"
    outcome = api.weight(model, 0.3, out=out, export=api.ExportOptions(example_input=x))
    report = outcome.report["export"]
    assert report.rewritten == ["bn"] and report.rel_diff < 1e-5
    (note,) = [w for w in outcome.report["warnings"] if "TorchScript exporter" in w]
    assert "torch.export could not capture" in note and "fixed 1 Python value" in note
    # the written graph is the corrected layer: against the float64 reference on new inputs of that branch
    x2 = torch.randn(3, 3, 6, 6)
    got = run_onnx(out, x2)[0]
    with torch.no_grad():
        h = model.conv(x2).numpy()
    bn = model.bn
    stats = [t.detach().numpy() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    want = np.maximum(corrected_bn_reference(h, *stats, bn.eps, 0.3, 0.3), 0.0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_both_exporters_failing_raise_torch_exports_error(tmp_path):
    class Eig(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(x).unsqueeze(-1)
            return torch.linalg.eigvalsh(y @ y.transpose(1, 2))

    with pytest.raises(onnx_export.OnnxError) as info:
        export_plain(Eig().eval(), torch.randn(4, 3))
    assert info.value.message.startswith("torch.onnx.export failed")
    assert "the TorchScript exporter failed too" in (info.value.detail or "")


class PerImage(Branchy):
    """Like torchvision's detection models: the batch is split into images, so a trace fixes its size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if h.sum() > -1e9:
            h = torch.relu(h)
        return torch.stack([img.mean() for img in h.unbind(0)])


def test_a_trace_that_fixes_the_batch_size_is_written_for_that_size(tmp_path, capfd):
    torch.manual_seed(1)
    model = PerImage().eval()
    x = torch.randn(3, 3, 6, 6)
    out = tmp_path / "p.onnx"
    outcome = api.weight(model, 0.2, out=out, export=api.ExportOptions(example_input=x))
    (note,) = [w for w in outcome.report["warnings"] if "TorchScript exporter" in w]
    assert "batches of exactly 3" in note
    # the probe with a larger batch fails inside onnxruntime, which must not log that failure as an error
    # on the console: the warning above is what the user is told
    assert "onnxruntime" not in capfd.readouterr().err
    dims = load_onnx(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 3, 6, 6]
    with torch.no_grad():
        want = outcome.model(x).numpy()
    np.testing.assert_allclose(run_onnx(out, x)[0], want, atol=1e-5, rtol=1e-4)
    # a graph that does take other batch sizes keeps its symbolic batch (Branchy, above)
    api.weight(Branchy().eval(), 0.2, out=tmp_path / "b.onnx", export=api.ExportOptions(example_input=x))
    assert load_onnx(tmp_path / "b.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_param

"""estimate / recalibrate / sweep-alpha directly on ONNX graphs through onnxruntime (bncorrect.onnx_passes),
checked against the PyTorch path on a model that exists in both forms, and against direct computations."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bncorrect import api
from bncorrect.corrections import Corrections, LayerCorrection, load_corrections, save_corrections
from bncorrect.errors import DataError, NoBatchNormError, UsageError
from bncorrect.onnx_export import _export_legacy, run_onnx
from bncorrect.onnx_passes import (
    correctable_layers,
    recalibrate_onnx,
    tap_graph,
    training_graph,
)
from bncorrect.onnx_rewrite import find_bn_nodes, load_onnx, match_layers

GRID_STEP = 0.1 / 3**5  # resolution of bncorrect.estimation.minimise_on_grid
SAMPLE_BUDGET = 1 << 13  # a reservoir of part of the data: sampling is exercised, the grid search is cheap
N = 70  # not a multiple of the batch sizes used: the short last batch is dropped and counted
B = 4


class Net2d(nn.Module):
    """Conv2d + BatchNorm2d twice, then a rank-2 BatchNorm1d on (N, C) features before the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 7, bias=False)
        self.head = nn.BatchNorm1d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h))).mean((2, 3))
        return self.head(self.fc(h))


class Net1d(nn.Module):
    """Conv1d + BatchNorm1d on (N, C, L) twice, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(h))).mean(2))


def _trained_looking(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


CASES = {
    # name: (factory, example shape, opset of the ONNX export, number of classes)
    "conv2d": (Net2d, (3, 6, 6), 18, 7),  # opset 18: ReduceMean axes as an input, LayerNormalization stats
    "conv1d": (Net1d, (2, 12), 13, 5),  # opset 13: axes as attributes, two-pass statistics
}


class Pair:
    """One model in both forms, and data for it."""

    def __init__(self, name: str, folder: Path) -> None:
        factory, shape, opset, classes = CASES[name]
        self.net = _trained_looking(factory(), seed=len(name))
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(N, *shape, generator=g) * 1.5 + 0.3
        self.y = torch.randint(0, classes, (N,), generator=g)
        self.data = folder / f"{name}.npz"
        np.savez(self.data, x=self.x.numpy(), y=self.y.numpy())
        self.proto = _export_legacy(self.net, (self.x[:2],), opset, True)
        self.onnx = folder / f"{name}.onnx"
        onnx.save(self.proto, str(self.onnx))
        self.bn = [n for n, m in self.net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.node = match_layers(self.proto, self.bn)  # PyTorch name -> BN node name

    def torch_model(self) -> nn.Module:
        return copy.deepcopy(self.net)  # api calls correct the module they are given in place


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> Pair:
    return Pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def pair2d(tmp_path_factory) -> Pair:
    return Pair("conv2d", tmp_path_factory.mktemp("conv2d_cli"))


# ------------------------------------------------------------------------------------------- references
def _hooked_inputs(model: nn.Module, names: list[str], run) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, i, n=n: seen[n].append(i[0].double()))
        for n in names
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(t, dim=(0, *range(2, t.dim())), correction=0)
    return mean, var


def direct_train_stats(net: nn.Module, x: torch.Tensor, b: int, names: list[str]) -> dict:
    """PreciseBN by hand: the model in torch's own training mode, fed group after group of b examples."""
    work = copy.deepcopy(net).train()
    usable = (len(x) // b) * b
    seen = _hooked_inputs(work, names, lambda: [work(x[i : i + b]) for i in range(0, usable, b)])
    return {n: _moments(torch.cat(v)) for n, v in seen.items()}


def direct_eval_stats(net: nn.Module, x: torch.Tensor, names: list[str]) -> dict:
    """Inference-consistent statistics by hand: all of x at once, layer after layer in forward order."""
    work = copy.deepcopy(net).eval()
    out = {}
    for n in names:
        (t,) = _hooked_inputs(work, [n], lambda: work(x))[n]
        out[n] = _moments(t)
        bn = work.get_submodule(n)
        bn.running_mean.copy_(out[n][0])
        bn.running_var.copy_(out[n][1])
    return out


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------- the graphs
def test_training_graph_normalizes_groups_like_torch_training_mode(pair: Pair) -> None:
    nodes = [pair.node[n] for n in pair.bn]
    graph = training_graph(pair.proto, dict.fromkeys(nodes, B))
    layers = correctable_layers(pair.proto)
    taps = tap_graph(graph, [ly.x for ly in layers], keep_outputs=True)
    x = pair.x[:12]
    logits, *inputs = (torch.from_numpy(a) for a in run_onnx(taps, x))
    work = copy.deepcopy(pair.net).train()  # torch's own training mode, one group of B at a time
    outs: list[torch.Tensor] = []
    seen = _hooked_inputs(work, pair.bn, lambda: [outs.append(work(x[i : i + B])) for i in range(0, 12, B)])
    _close(logits, torch.cat(outs))
    for name, got in zip(pair.bn, inputs, strict=True):
        _close(got, torch.cat(seen[name]))


def test_tap_graph_prunes_what_no_tap_needs(pair: Pair) -> None:
    first = correctable_layers(pair.proto)[0]
    pruned = tap_graph(pair.proto, [first.x])
    assert [o.name for o in pruned.graph.output] == [first.x]
    assert len(pruned.graph.node) < len(pair.proto.graph.node)
    assert not any(n.op_type == "BatchNormalization" for n in pruned.graph.node)
    (got,) = run_onnx(pruned, pair.x[:3])
    (want,) = _hooked_inputs(pair.net, [pair.bn[0]], lambda: pair.net(pair.x[:3]))[pair.bn[0]]
    _close(torch.from_numpy(got), want)
    # IR < 4 style: every initializer also listed as a graph input; the pruned ones must not stay inputs
    old_style = copy.deepcopy(pair.proto)
    old_style.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in old_style.graph.initializer
    )
    pruned = tap_graph(old_style, [first.x])
    assert {v.name for v in pruned.graph.input} <= {pair.proto.graph.input[0].name} | {
        t.name for t in pruned.graph.initializer
    }
    got_old = recalibrate_onnx(old_style, [(pair.x,)], upstream="eval", device="cpu").stats
    want_all = recalibrate_onnx(pair.proto, [(pair.x,)], upstream="eval", device="cpu").stats
    for name, (mean, var) in want_all.items():
        _close(got_old[name][0], mean)
        _close(got_old[name][1], var)


# ------------------------------------------------------------------------------------------- estimate
def test_estimate_agrees_with_pytorch(pair: Pair) -> None:
    kw = {"device": "cpu", "seed": 3, "sample_budget": SAMPLE_BUDGET}
    pt = api.estimate(pair.torch_model(), pair.data, B, **kw).report["estimate"]
    ox = api.estimate(pair.onnx, pair.data, B, **kw).report["estimate"]
    assert (ox.examples, ox.dropped) == (pt.examples, pt.dropped) == (N - N % B, N % B)
    by_node = {ly.name: ly for ly in ox.layers}
    assert set(by_node) == set(pair.node.values())
    for ly in pt.layers:
        got = by_node[pair.node[ly.name]]
        # same sample, same grid search: float32 rounding of the activations (~1e-7) may move the argmin
        # of a flat L_aux by one step of the finest grid (0.1 / 3^5 = 4.1e-4), never more than two
        assert got.alpha == pytest.approx(ly.alpha, abs=GRID_STEP * 2.01)
        assert got.beta == pytest.approx(ly.beta, abs=GRID_STEP * 2.01)
        assert got.l_aux == pytest.approx(ly.l_aux, rel=1e-5)
        assert got.l_aux_ema == pytest.approx(ly.l_aux_ema, rel=1e-5)
        assert got.l_aux <= got.l_aux_ema
        assert got.examples == ly.examples


def test_estimate_layer_batch_size_globs_node_names_and_recalibrate_first(pair2d: Pair) -> None:
    head = pair2d.node["head"]
    assert head == "/head/BatchNormalization"  # the legacy exporter's node name
    kw = {"device": "cpu", "seed": 1, "recalibrate_first": True, "upstream": "train", "max_examples": 60}
    kw["sample_budget"] = SAMPLE_BUDGET
    pt = api.estimate(pair2d.torch_model(), pair2d.data, B, layer_batch_size={"head": 8}, **kw)
    calls: list[tuple[str, int, int | None]] = []
    kw["progress"] = lambda *a: calls.append(a)
    ox = api.estimate(pair2d.onnx, pair2d.data, B, layer_batch_size={"/head/*": 8}, **kw)
    assert ox.report["estimate"].layer_batch_sizes[head] == 8
    assert ox.report["estimate"].dropped == pt.report["estimate"].dropped == 60 % 8
    assert ox.report["estimate"].examples == pt.report["estimate"].examples == 60 - 60 % 8
    assert ("estimate", 60, 60) in calls and ("recalibrate", 60, 60) in calls  # as the PyTorch path
    n_layers = len(pair2d.node)  # then the per-layer solves, counted in layers
    solves = [c for c in calls if c[0] == "solve alpha/beta"]
    assert solves == [("solve alpha/beta", i, n_layers) for i in range(n_layers + 1)]
    assert calls[-1] == solves[-1]
    for torch_name, node in pair2d.node.items():
        want, got = pt.corrections.layers[torch_name], ox.corrections.layers[node]
        assert float(got.alpha) == pytest.approx(float(want.alpha), abs=GRID_STEP * 2.01)
        assert float(got.beta) == pytest.approx(float(want.beta), abs=GRID_STEP * 2.01)
        _close(got.running_mean, want.running_mean)
        _close(got.running_var, want.running_var)
    assert ox.corrections.method == "evalnorm-offline+recalibrate"


# ------------------------------------------------------------------------------------------- recalibrate
@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_recalibrate_agrees_with_pytorch(pair: Pair, upstream: str) -> None:
    bs = B if upstream == "train" else None
    pt = api.recalibrate(
        pair.torch_model(), pair.data, upstream=upstream, batch_size=bs, device="cpu", seed=2
    )
    ox = api.recalibrate(pair.onnx, pair.data, upstream=upstream, batch_size=bs, device="cpu", seed=2)
    assert ox.report["recalibrate"].examples == pt.report["recalibrate"].examples
    for name, (mean, var) in pt.report["recalibrate"].stats.items():
        got_mean, got_var = ox.report["recalibrate"].stats[pair.node[name]]
        _close(got_mean, mean)
        _close(got_var, var)


def test_recalibrate_equals_direct_computation(pair: Pair) -> None:
    got = recalibrate_onnx(pair.proto, [(pair.x[:32],), (pair.x[32:],)], upstream="eval", device="cpu")
    assert got.examples == N and got.passes == len(pair.bn)
    for name, (mean, var) in direct_eval_stats(pair.net, pair.x, pair.bn).items():
        _close(got.stats[pair.node[name]][0], mean)
        _close(got.stats[pair.node[name]][1], var)
    batches = [(pair.x[:32],), (pair.x[32:],)]  # 32 + 38 examples: 2 of the 38 are dropped
    got = recalibrate_onnx(pair.proto, batches, upstream="train", batch_size=B, device="cpu")
    assert got.examples == N - N % B
    for name, (mean, var) in direct_train_stats(pair.net, pair.x[: N - N % B], B, pair.bn).items():
        _close(got.stats[pair.node[name]][0], mean)
        _close(got.stats[pair.node[name]][1], var)


# ------------------------------------------------------------------------------------------- sweep
def test_sweep_agrees_with_pytorch(pair: Pair, tmp_path: Path) -> None:
    # a per-layer candidate (per-channel alpha, recalibrated statistics) in PyTorch layer names
    stats = api.recalibrate(pair.torch_model(), pair.data, device="cpu").report["recalibrate"].stats
    layers = {}
    for k, (name, (mean, var)) in enumerate(stats.items()):
        alpha = torch.linspace(0.0, 0.4, mean.numel())
        layers[name] = LayerCorrection(alpha, torch.tensor(0.1 * k), mean, var)
    corr = save_corrections(Corrections(layers, "per-layer"), tmp_path / "per_layer.safetensors")
    kw = {"alphas": [0.0, 0.05, 0.3], "train_batch_size": B, "corrections": corr, "device": "cpu"}
    pt = api.sweep_alpha(pair.torch_model(), pair.data, **kw).report["sweep"]
    ox = api.sweep_alpha(pair.onnx, pair.data, **kw).report["sweep"]
    assert [r.label for r in ox.rows] == [r.label for r in pt.rows]
    assert len(ox.rows) == 5 and ox.n_examples == pt.n_examples == N
    for a, b in zip(pt.rows, ox.rows, strict=True):
        assert b.alpha == a.alpha and b.beta == a.beta
        for metric in ("nll", "top1", "top5"):
            assert b.value(metric) == pytest.approx(a.value(metric), abs=1e-5), (a.label, metric)
    assert ox.best.alpha == pt.best.alpha
    assert ox.rows[0].nll != ox.rows[2].nll  # the candidates really differ


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_estimate_and_recalibrate_write_safetensors_and_onnx(cli, pair2d: Pair, tmp_path: Path) -> None:
    out = tmp_path / "est.safetensors"
    res = cli("estimate", pair2d.onnx, "--data", pair2d.data, "-B", B, "-o", out, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert {ly["name"] for ly in report["layers"]} == set(pair2d.node.values())
    assert report["train_batch_size"] == B and report["output"] == str(out)
    corr = load_corrections(out)
    assert set(corr.layers) == set(pair2d.node.values())
    # applied to the graph, the estimate computes what the corrected PyTorch model computes
    graph = api.apply(pair2d.onnx, out).model
    by_torch_name = Corrections(
        {t: corr.layers[n] for t, n in pair2d.node.items()}, corr.method, corr.train_batch_size
    )
    corrected = api.apply(pair2d.torch_model(), by_torch_name).model
    got = torch.from_numpy(run_onnx(graph, pair2d.x)[0])
    assert find_bn_nodes(graph) == []  # every layer got a non-zero correction: all rewritten
    with torch.no_grad():
        _close(got, corrected(pair2d.x), tol=1e-4)

    recal = tmp_path / "recal.onnx"
    res = cli("recalibrate", pair2d.onnx, "--data", pair2d.data, "-o", recal)
    assert res.code == 0, res.err
    assert len(find_bn_nodes(load_onnx(recal))) == len(pair2d.bn)  # still plain (foldable) BN nodes
    stats = direct_eval_stats(pair2d.net, pair2d.x, pair2d.bn)
    ref = copy.deepcopy(pair2d.net)
    for name, (mean, var) in stats.items():
        ref.get_submodule(name).running_mean.copy_(mean)
        ref.get_submodule(name).running_var.copy_(var)
    with torch.no_grad():
        _close(torch.from_numpy(run_onnx(recal, pair2d.x)[0]), ref(pair2d.x), tol=1e-4)


def test_cli_estimate_table_names_the_pytorch_layer_of_each_node(cli, pair2d: Pair) -> None:
    res = cli("estimate", pair2d.onnx, "--data", pair2d.data, "-B", B)
    assert res.code == 0, res.err
    for torch_name, node in pair2d.node.items():
        assert (f"{node} ({torch_name})" if node != torch_name else node) in res.out


def test_cli_sweep_alpha_on_onnx(cli, pair2d: Pair, tmp_path: Path) -> None:
    report, chosen = tmp_path / "sweep.json", tmp_path / "chosen.onnx"
    res = cli(
        "sweep-alpha",
        pair2d.onnx,
        "--data",
        pair2d.data,
        "--alphas",
        "0,0.1",
        "--report",
        report,
        "-o",
        chosen,
    )
    assert res.code == 0, res.err
    data = json.loads(report.read_text())
    assert data["n_examples"] == N and [r["alpha"] for r in data["rows"]] == [0.0, 0.1]
    assert {"alpha", "nll", "top1", "top5"} <= set(data["best"])
    assert chosen.is_file()


# ------------------------------------------------------------------------------------------- errors
def test_sweep_needs_labels(cli, pair2d: Pair, tmp_path: Path) -> None:
    unlabelled = tmp_path / "x.npy"
    np.save(unlabelled, pair2d.x.numpy())
    with pytest.raises(DataError, match="needs labels"):
        api.sweep_alpha(pair2d.onnx, unlabelled, alphas=[0.0, 0.1])
    res = cli("sweep-alpha", pair2d.onnx, "--data", unlabelled, "-o", tmp_path / "out.onnx")
    assert res.code == 1 and "x.npy" in res.err and "labels" in res.err
    assert not (tmp_path / "out.onnx").exists()


def test_data_of_the_wrong_shape_names_the_file(cli, pair2d: Pair, tmp_path: Path) -> None:
    bad = tmp_path / "bad_channels.npz"
    np.savez(bad, x=np.zeros((16, 2, 6, 6), np.float32), y=np.zeros(16, np.int64))
    for command in ("estimate", "recalibrate", "sweep-alpha"):
        args = ["-B", B] if command == "estimate" else []
        res = cli(command, pair2d.onnx, "--data", bad, *args, "-o", tmp_path / "out.safetensors")
        assert res.code == 1, (command, res.err)
        assert "bad_channels.npz" in res.err and "shape" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "out.safetensors").exists()


def test_folded_bn_graph_is_refused(cli, tmp_path: Path) -> None:
    import io
    import warnings

    net = _trained_looking(Net1d(), seed=0)  # every BN follows a Conv: the exporter folds them all
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 2, 12),), buf, dynamo=False)  # eval mode, legacy defaults
    folded = tmp_path / "folded.onnx"
    folded.write_bytes(buf.getvalue())
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((8, 2, 12), np.float32), y=np.zeros(8, np.int64))
    with pytest.raises(NoBatchNormError, match="folded"):
        api.estimate(folded, data, B)
    with pytest.raises(NoBatchNormError, match="folded"):
        api.sweep_alpha(folded, data)
    res = cli("recalibrate", folded, "--data", data, "-o", tmp_path / "out.onnx")
    assert res.code == 1 and "folded.onnx" in res.err and "optimize=False" in res.err
    assert not (tmp_path / "out.onnx").exists()


def test_fixed_batch_graph_runs_on_other_batch_sizes(pair2d: Pair) -> None:
    fixed = _export_legacy(pair2d.net, (pair2d.x[:2],), 18, False)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    got = recalibrate_onnx(fixed, [(pair2d.x,)], upstream="train", batch_size=B, device="cpu")
    want = recalibrate_onnx(pair2d.proto, [(pair2d.x,)], upstream="train", batch_size=B, device="cpu")
    for name, (mean, var) in want.stats.items():
        _close(got.stats[name][0], mean)
        _close(got.stats[name][1], var)


def test_options_that_do_not_apply_to_onnx_are_refused(pair2d: Pair) -> None:
    import onnxruntime as ort

    with pytest.raises(UsageError, match="forward_fn"):
        api.estimate(pair2d.onnx, pair2d.data, B, forward_fn=lambda m, b: m(b[0]))
    with pytest.raises(UsageError, match="mps"):
        api.recalibrate(pair2d.onnx, pair2d.data, device="mps")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="CUDAExecutionProvider"):
            api.sweep_alpha(pair2d.onnx, pair2d.data, alphas=[0.0], device="cuda")
    with pytest.raises(UsageError, match="B >= 2"):  # a rank-2 BN with B = 1, as on the PyTorch path
        api.estimate(pair2d.onnx, pair2d.data, 1)
    with pytest.raises(UsageError, match="batch_size=8"):
        api.recalibrate(pair2d.onnx, pair2d.data, upstream="train")


def test_bn_on_the_graph_input_is_tapped_through_an_identity(tmp_path: Path) -> None:
    net = _trained_looking(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), seed=5)
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1
    proto = _export_legacy(net, (x[:2],), 18, True)
    first = correctable_layers(proto)[0]
    assert first.x == proto.graph.input[0].name
    names = ["0", "2"]
    node = match_layers(proto, names)
    got = recalibrate_onnx(proto, [(x[:8],), (x[8:],)], upstream="eval", device="cpu")
    for name, (mean, var) in direct_eval_stats(net, x, names).items():
        _close(got.stats[node[name]][0], mean)
        _close(got.stats[node[name]][1], var)
    got = recalibrate_onnx(proto, [(x,)], upstream="train", batch_size=B, device="cpu")
    for name, (mean, var) in direct_train_stats(net, x, B, names).items():
        _close(got.stats[node[name]][0], mean)
        _close(got.stats[node[name]][1], var)

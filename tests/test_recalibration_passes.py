"""The iterative inference-consistent recalibration (the default of `recalibrate --upstream eval`) against
the exact layer-by-layer scheme and a direct float64 computation, on a deep net built here (residual and
dense connections, 24 BN layers in one dependency chain), in PyTorch and in onnxruntime."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from bncorrect import api
from bncorrect.errors import UsageError
from bncorrect.onnx_export import _export_legacy
from bncorrect.onnx_passes import bn_depths, correctable_layers, recalibrate_onnx
from bncorrect.onnx_rewrite import match_layers
from bncorrect.recalibration import recalibrate_stats

from . import toys

#: The statistics of the iterative scheme (default tolerance) agree with the exact ones to this much:
#: means relative to sqrt(var + eps), variances relative to var + eps (measured: 1.2e-5 on this net)
AGREE = 3e-5
N = 240  # batches of 64: the last one holds 48


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _Dense(nn.Module):
    """Pre-activation dense layers (DenseNet): BN-ReLU-Conv on the concatenation of all earlier maps."""

    def __init__(self, c: int, growth: int, n: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(c + k * growth) for k in range(n))
        self.convs = nn.ModuleList(
            nn.Conv2d(c + k * growth, growth, 3, padding=1, bias=False) for k in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for norm, conv in zip(self.norms, self.convs, strict=True):
            feats.append(conv(torch.relu(norm(torch.cat(feats, 1)))))
        return torch.cat(feats, 1)


class DeepNet(nn.Module):
    """Stem Conv-BN-ReLU, 8 residual blocks (16 BN), 5 dense layers, a transition BN and a BatchNorm1d on
    the pooled features: 24 BN layers, each depending on all before it. Input (N, 3, 6, 6)."""

    def __init__(self, c: int = 8, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*(_Residual(c) for _ in range(8)))
        self.dense = _Dense(c, growth, 5)
        self.transition = nn.BatchNorm2d(c + 5 * growth)
        self.fc = nn.Linear(c + 5 * growth, 6, bias=False)
        self.head = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.transition(self.dense(self.blocks(self.stem(x)))))
        return self.head(self.fc(h.mean((2, 3))))


def deep_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = DeepNet()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # stored statistics far off: never used
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 20 + 0.1)
    return net.eval()


def bn_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def deep() -> tuple[nn.Module, torch.Tensor, list[tuple[torch.Tensor]]]:
    net = deep_net()
    x, _ = toys.data(N, (3, 6, 6), seed=3)
    return net, x, [(x[i : i + 64],) for i in range(0, N, 64)]


@pytest.fixture(scope="module")
def reference(deep) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inference-consistent statistics by hand, in float64: all of the data at once, layer after layer in
    forward order, each with the earlier ones already holding theirs."""
    net, x, _ = deep
    work = copy.deepcopy(net).double()
    out = {}
    for name in bn_names(net):
        bn = work.get_submodule(name)
        seen: list[torch.Tensor] = []
        handle = bn.register_forward_pre_hook(lambda _m, i, seen=seen: seen.append(i[0]))
        with torch.no_grad():
            work(x.double())
        handle.remove()
        (h,) = seen
        var, mean = torch.var_mean(h, dim=(0, *range(2, h.dim())), correction=0)
        out[name] = (mean, var)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return out


def relative_difference(got: dict, want: dict, eps: float = 1e-5) -> float:
    """Largest difference of a mean relative to sqrt(var + eps), or of a variance relative to var + eps."""
    worst = 0.0
    for name, (mean, var) in want.items():
        scale = var.double() + eps
        d_mean = (got[name][0].double() - mean.double()).abs() / scale.sqrt()
        d_var = (got[name][1].double() - var.double()).abs() / scale
        worst = max(worst, float(d_mean.max()), float(d_var.max()))
    return worst


# ------------------------------------------------------------------------------------------- PyTorch
def test_iterative_equals_layer_by_layer_on_a_deep_net(deep, reference):
    net, _, batches = deep
    calls: list[tuple[str, int, int | None]] = []
    got = recalibrate_stats(net, batches, total_examples=N, progress=lambda *a: calls.append(a))
    exact = recalibrate_stats(net, batches, exact=True)
    assert relative_difference(exact.stats, reference) < 1e-5  # the reference scheme, float32 activations
    assert relative_difference(got.stats, reference) < AGREE
    assert relative_difference(got.stats, exact.stats) < AGREE
    assert exact.passes == 24 and exact.exact and not got.exact
    # it stops well before depth + 1 = 24 passes, within the tolerance, and says so
    assert got.scheme == "iterative" and got.converged and got.examples == N
    assert 3 <= got.passes <= 8 and got.changes is not None and len(got.changes) == got.passes - 1
    assert got.max_change == got.changes[-1] <= got.tolerance == 1e-4
    assert got.changes[0] > 1e-3  # pass 2 against pass 1 (batch statistics) does change things
    # one progress bar per pass, each ending at all of the examples
    labels = list(dict.fromkeys(c[0] for c in calls))
    assert labels == [f"recalibrate pass {k} of ≤10" for k in range(1, got.passes + 1)]
    assert all(c[2] == N for c in calls) and [c for c in calls if c[1] == N] == [
        (label, N, N) for label in labels
    ]


def test_pass_cap_reports_the_change_left(deep, reference):
    net, _, batches = deep
    got = recalibrate_stats(net, batches, max_passes=2)
    assert got.passes == 2 and not got.converged and got.max_change is not None and got.max_change > 1e-4
    assert relative_difference(got.stats, reference) > 1e-4  # two passes are not enough on 24 layers
    tight = recalibrate_stats(net, batches, tolerance=1e-6, max_passes=12)
    assert relative_difference(tight.stats, reference) < AGREE


def test_tiny_chain_is_exact_after_depth_plus_one_passes():
    """toys.conv_net: BN "1" -> BN "5" -> BatchNorm1d "10", a chain of depth 2: exact after 3 passes."""
    model = toys.conv_net(seed=6)
    x, _ = toys.data(90, seed=7)
    batches = [(x[i : i + 25],) for i in range(0, 90, 25)]
    exact = recalibrate_stats(model, batches, exact=True).stats
    runs = {k: recalibrate_stats(model, batches, tolerance=1e-12, max_passes=k) for k in (2, 3, 4)}
    assert relative_difference(runs[2].stats, exact) > 1e-3  # the last layer is not there yet
    assert relative_difference(runs[3].stats, exact) < 1e-6
    assert relative_difference(runs[4].stats, exact) < 1e-6
    assert runs[4].max_change is not None and runs[4].max_change < 1e-6  # nothing moved in pass 4


def test_data_in_another_order_is_refused():
    model = toys.conv_net()
    x, _ = toys.data(40, seed=1)

    class Reshuffled:
        """A re-iterable that gives its batches in a new order each time (a shuffling DataLoader)."""

        def __init__(self) -> None:
            self.round = 0

        def __iter__(self):
            self.round += 1
            order = torch.randperm(40, generator=torch.Generator().manual_seed(self.round))
            return iter([(x[order[i : i + 10]],) for i in range(0, 40, 10)])

    with pytest.raises(UsageError, match="same batches in the same order") as exc:
        recalibrate_stats(model, Reshuffled())
    assert "exact" in str(exc.value.hint)
    exact = recalibrate_stats(model, Reshuffled(), exact=True)  # the exact scheme does not mind
    ordered = recalibrate_stats(model, [(x[i : i + 10],) for i in range(0, 40, 10)])
    assert relative_difference(ordered.stats, exact.stats) < 1e-5


# ------------------------------------------------------------------------------------------- onnxruntime
@pytest.fixture(scope="module")
def deep_onnx(deep):
    net, x, _ = deep
    proto = _export_legacy(net, (x[:2],), 17, True)
    return proto, match_layers(proto, bn_names(net))


def test_bn_depths_of_the_deep_net(deep, deep_onnx):
    net, _, _ = deep
    proto, node = deep_onnx
    depths = bn_depths(proto, correctable_layers(proto))
    # every BN layer depends on every one before it: the k-th in forward order has k upstream
    assert [depths[node[n]] for n in bn_names(net)] == list(range(24))


def test_onnx_iterative_equals_layer_by_layer_on_a_deep_net(deep, deep_onnx, reference):
    _, _, batches = deep
    proto, node = deep_onnx
    calls: list[tuple[str, int, int | None]] = []
    got = recalibrate_onnx(proto, batches, device="cpu", progress=lambda *a: calls.append(a))
    exact = recalibrate_onnx(proto, batches, device="cpu", exact=True)
    by_torch_name = {n: got.stats[node[n]] for n in reference}
    assert relative_difference({n: exact.stats[node[n]] for n in reference}, reference) < 1e-5
    assert relative_difference(by_torch_name, reference) < AGREE
    assert got.converged and not got.exact and 3 <= got.passes <= 8 and got.max_change <= 1e-4
    assert list(dict.fromkeys(c[0] for c in calls)) == [
        f"recalibrate pass {k} of ≤10" for k in range(1, got.passes + 1)
    ]
    assert {c[0] for c in exact_progress(proto, batches)} == {"recalibrate layer by layer (24 layers)"}


def exact_progress(proto, batches) -> list[tuple[str, int, int | None]]:
    calls: list[tuple[str, int, int | None]] = []
    recalibrate_onnx(proto, batches[:1], device="cpu", exact=True, progress=lambda *a: calls.append(a))
    assert calls[-1][1] == 24 * len(batches[0][0])  # one bar over every layer's pass
    return calls


def test_onnx_tiny_chain_stops_exact_at_depth_plus_one():
    model = toys.conv_net(seed=6)
    x, _ = toys.data(90, seed=7)
    batches = [(x[i : i + 25],) for i in range(0, 90, 25)]
    proto = _export_legacy(model, (x[:2],), 17, True)
    node = match_layers(proto, ["1", "5", "10"])
    got = recalibrate_onnx(proto, batches, device="cpu")
    assert got.passes == 3 and got.exact and got.converged  # the graph's depth is 2: no 4th pass needed
    exact = recalibrate_stats(model, batches, exact=True).stats
    assert relative_difference({n: got.stats[node[n]] for n in exact}, exact) < 1e-5


# ------------------------------------------------------------------------------------------- api, CLI
def test_api_and_cli_options(tmp_path, cli, deep, reference):
    from torch.utils.data import DataLoader, TensorDataset

    net, x, _ = deep
    data = tmp_path / "deep.npz"
    np.savez(data, x=x.numpy(), y=np.zeros(N, np.int64))
    # the api reads batches of up to 4M input values: all 240 examples in one batch, where pass 1 (each
    # layer normalized with the batch's own statistics) is inference-consistent: it ends there
    whole = api.recalibrate(net, data, device="cpu").report["recalibrate"]
    assert whole.passes == 1 and whole.exact and whole.converged and whole.max_change is None
    assert relative_difference(whole.stats, reference) < 1e-5
    loader = DataLoader(TensorDataset(x), batch_size=64)  # a loader is used as it is
    capped = api.recalibrate(net, loader, max_passes=2, device="cpu")
    (warning,) = capped.report["warnings"]
    assert "stopped after 2 passes" in warning and "max_passes=4" in warning and "exact=True" in warning
    assert capped.corrections.metrics["passes"] == 2 and capped.corrections.metrics["scheme"] == "iterative"
    weights = tmp_path / "deep.pt"
    torch.save(net, weights)
    res = cli("recalibrate", weights, "--data", data, "--trust-pickle", "--exact", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert (out["scheme"], out["passes"], out["exact"]) == ("layer by layer", 24, True)
    assert out["max_change"] == 0.0 and out["converged"]
    res = cli("recalibrate", weights, "--data", data, "--trust-pickle", "--max-passes", "1")
    assert res.code != 0 and "--max-passes 1" in res.err and "--exact" in res.err


def test_default_scheme_is_exact_when_it_costs_no_more():
    """exact=None: layer by layer when its ~L/2 passes fit in max_passes and the data is several batches;
    the iterative scheme for one batch (exact after pass 1) and for deep nets."""
    from torch.utils.data import DataLoader, TensorDataset

    from bncorrect.recalibration import choose_exact

    assert choose_exact(3, 4, 10) and choose_exact(20, None, 10)
    assert not choose_exact(3, 1, 10) and not choose_exact(21, 4, 10) and not choose_exact(24, 5, 10)
    model = toys.conv_net(seed=0)  # 3 BN layers
    x, _ = toys.data(48, seed=3)
    loader = DataLoader(TensorDataset(x), batch_size=16)
    auto = api.recalibrate(model, loader, device="cpu").report["recalibrate"]
    assert auto.scheme == "layer by layer" and auto.exact
    exact = recalibrate_stats(model, loader, exact=True)
    assert relative_difference(auto.stats, exact.stats) == 0.0
    forced = api.recalibrate(model, loader, exact=False, device="cpu").report["recalibrate"]
    assert forced.scheme == "iterative"
    assert api.recalibrate(model, x, device="cpu").report["recalibrate"].scheme == "iterative"  # 1 batch


def test_cli_exact_and_iterative_flags(tmp_path, cli):
    model = toys.conv_net(seed=0)
    weights = tmp_path / "m.pt"
    torch.save(model, weights)
    x, _ = toys.data(300, seed=4)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy())
    for flag, scheme in (("--exact", "layer by layer"), ("--iterative", "iterative")):
        res = cli("recalibrate", weights, "--data", data, "--trust-pickle", flag, "--json")
        assert res.code == 0, res.err
        assert json.loads(res.out)["scheme"] == scheme

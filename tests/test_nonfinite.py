"""Nothing wrong passes silently: broken statistics in a checkpoint are visible, NaN/Inf activations in any
pass are an error naming the layer and the data, recalibrated statistics are never non-finite, and layers
with ``track_running_stats=False`` normalize over groups of B in the training-mode passes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect import correction as C
from bncorrect.diagnosis import diagnose_model
from bncorrect.errors import NumericalError
from bncorrect.estimation import estimate_alpha_beta, estimate_from_pass
from bncorrect.layers import (
    CorrectedNorm,
    batch_statistics_layers,
    correct_model,
    corrected_layers,
    find_norm_layers,
    grouped_batch_statistics,
)
from bncorrect.passes import resolve_device, training_mode_pass
from bncorrect.recalibration import recalibrate_stats
from bncorrect.sweep import sweep_alpha

from . import toys

DATA = "val.npz (test data)"  # the data_hint the passes get: every message must name it


def _nan_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = toys.data(n, seed=3)
    x[5, 1, 2, 3] = float("nan")
    return x, y


def _expect(exc: pytest.ExceptionInfo[NumericalError], layer: str, *words: str) -> str:
    """The error names ``layer`` and the data, says what to do, and contains ``words``."""
    text = str(exc.value)
    assert f"layer {layer}" in text, text
    assert DATA in text, text
    assert exc.value.hint, text
    for w in words:
        assert w in text, text
    return text


# ---------------------------------------------------------------------------------------------- models
class Log(nn.Module):
    """log(x): NaN for the negative values of finite activations (the model makes NaN of fine data)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Guard(nn.Module):
    """NaN wherever |x| exceeds ``limit``: lets a test choose which normalization yields NaN logits."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x.abs() > self.limit, torch.full_like(x, float("nan")), x)


class Reciprocal(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 / x


class NanToNum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def nan_inside_net() -> nn.Module:
    """Finite data, and NaN made between two BN layers: the second BN layer ("4") is the first to see it."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        Log(),  # BN outputs are about N(0, 1): half of them negative
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    return toys._init(model, 4)


def guarded_net(limit: float) -> nn.Module:
    """BN2d on the raw input with a large running variance: plain BN outputs stay within 0.5 in magnitude,
    per-example normalization (alpha = beta = 1) reaches 1.5 and more. ``Guard(limit)`` then decides."""
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, Guard(limit), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    toys._init(model, 5)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(100.0)
    return model.eval()


def inf_input_net() -> nn.Module:
    """Inf at the input of BN layer "3" (1 / relu = Inf where relu is 0) that ``NanToNum`` hides again:
    the logits are finite, the input of a BN layer is not."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        Reciprocal(),
        nn.BatchNorm2d(4),
        NanToNum(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    return toys._init(model, 6)


def _broken(kind: str) -> nn.Module:
    model = toys.conv_net(seed=0)
    bn = model[1]
    with torch.no_grad():
        if kind == "nan-var":
            bn.running_var[0] = float("nan")
        elif kind == "negative-var":
            bn.running_var[2] = -0.5
        elif kind == "inf-mean":
            bn.running_mean[1] = float("inf")
        elif kind == "nan-weight":
            bn.weight[3] = float("nan")
    return model


# ------------------------------------------------------------------------------- 1. broken statistics
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan-var", "running_var is NaN in channel 0"),
        ("negative-var", "running_var is negative in channel 2"),
        ("inf-mean", "running_mean is infinite in channel 1"),
        ("nan-weight", "weight is NaN in channel 3"),
    ],
)
def test_broken_statistics_make_a_layer_not_correctable(kind, reason):
    layers = {ly.name: ly for ly in find_norm_layers(_broken(kind))}
    bad = layers["1"]
    assert bad.stats_problem == reason
    assert not bad.correctable and bad.reason == reason
    summary = bad.summary()
    assert summary["stats_problem"] == reason and summary["correctable"] is False
    assert summary["reason"] == reason
    for name in ("5", "10"):
        assert layers[name].correctable and layers[name].stats_problem is None
        assert layers[name].summary()["stats_problem"] is None


def test_broken_statistics_seen_through_a_corrected_wrapper():
    model = correct_model(_broken("nan-var"), 0.1)  # still wrappable: recalibrate must reach it
    assert isinstance(model[1], CorrectedNorm)
    (bad,) = [ly for ly in find_norm_layers(model) if ly.name == "1"]
    assert bad.stats_problem == "running_var is NaN in channel 0" and not bad.correctable


def test_structural_reason_comes_first():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    (ly,) = find_norm_layers(model)
    assert ly.stats_problem is None and not ly.correctable
    assert "track_running_stats=False" in (ly.reason or "")


@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_recalibrate_repairs_broken_statistics(upstream):
    """A checkpoint with NaN running statistics is recalibrated like the intact one: the statistics of a
    layer's input do not depend on its own stored statistics."""
    x, _ = toys.data(32, seed=2)
    broken = _broken("nan-var")
    before = copy.deepcopy(broken.state_dict())
    got = recalibrate_stats(broken, [(x[:16],), (x[16:],)], upstream=upstream, batch_size=4)
    want = recalibrate_stats(toys.conv_net(seed=0), [(x[:16],), (x[16:],)], upstream=upstream, batch_size=4)
    assert set(got.stats) == {"1", "5", "10"}
    for name, (mean, var) in want.stats.items():
        torch.testing.assert_close(got.stats[name][0], mean)
        torch.testing.assert_close(got.stats[name][1], var)
    for k, v in broken.state_dict().items():  # the model passed in is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    assert math.isnan(float(broken[1].running_var[0]))


# --------------------------------------------------------------------------- 2. non-finite activations
def test_estimate_nan_in_the_data():
    x, _ = _nan_data()
    with pytest.raises(NumericalError) as exc:
        estimate_alpha_beta(toys.conv_net(), [(x,)], 4, data_hint=DATA)
    _expect(exc, "1", "NaN")
    assert "examples with NaN/Inf values" in str(exc.value.hint)


def test_estimate_nan_made_by_the_model_names_the_first_layer_that_sees_it():
    x, _ = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        estimate_alpha_beta(nan_inside_net(), [(x,)], 4, data_hint=DATA)
    text = _expect(exc, "4", "non-finite values (NaN/Inf) at the input of layer 4")
    assert "layer 1" not in text
    assert "first non-finite values appear at the input of layer 4" in str(exc.value.hint)


def test_estimate_refuses_broken_running_statistics():
    x, _ = toys.data(16, seed=3)
    with pytest.raises(NumericalError, match=r"layer 1 .*running_var is NaN in channel 0") as exc:
        estimate_alpha_beta(_broken("nan-var"), [(x,)], 4, data_hint=DATA)
    assert "recalibrate" in str(exc.value.hint)


@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_recalibrate_nan_in_the_data(upstream):
    x, _ = _nan_data()
    with pytest.raises(NumericalError) as exc:
        recalibrate_stats(toys.conv_net(), [(x,)], upstream=upstream, batch_size=4, data_hint=DATA)
    _expect(exc, "1", "NaN")


@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_recalibrate_nan_made_by_the_model(upstream):
    x, _ = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        recalibrate_stats(nan_inside_net(), [(x,)], upstream=upstream, batch_size=4, data_hint=DATA)
    _expect(exc, "4", "non-finite")


def test_diagnose_nan_in_the_data():
    x, _ = _nan_data()
    with pytest.raises(NumericalError) as exc:
        diagnose_model(toys.conv_net(), [(x,)], 4, data_hint=DATA)
    _expect(exc, "1", "NaN")


def test_diagnose_broken_statistics_name_the_layer():
    x, _ = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        diagnose_model(_broken("nan-var"), [(x,)], 4, data_hint=DATA)
    _expect(exc, "1", "running_var is NaN in channel 0")
    assert "recalibrate" in str(exc.value.hint)


@pytest.mark.parametrize("stack", [True, False])
def test_sweep_nan_in_the_data(stack):
    x, y = _nan_data()
    with pytest.raises(NumericalError) as exc:
        sweep_alpha(toys.conv_net(), [(x, y)], [0.0, 0.1], stack=stack, data_hint=DATA)
    _expect(exc, "1", "NaN")


@pytest.mark.parametrize("stack", [True, False])
def test_sweep_broken_statistics_name_the_layer(stack):
    x, y = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        sweep_alpha(_broken("nan-var"), [(x, y)], [0.0, 0.1], stack=stack, data_hint=DATA)
    _expect(exc, "1", "output of layer 1", "running_var is NaN in channel 0")
    assert "recalibrate" in str(exc.value.hint)


@pytest.mark.parametrize("stack", [True, False])
def test_sweep_non_finite_bn_input_is_an_error_even_with_finite_logits(stack):
    x, y = toys.data(16, seed=3)
    model = inf_input_net()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()  # the logits hide it
    with pytest.raises(NumericalError) as exc:
        sweep_alpha(model, [(x, y)], [0.0, 0.1], stack=stack, data_hint=DATA)
    _expect(exc, "3", "input of layer 3", "Inf")


def test_sweep_plain_bn_outputs_non_finite_outside_the_bn_layers():
    x, y = toys.data(16, seed=3)
    with pytest.raises(NumericalError, match="plain BN") as exc:
        sweep_alpha(guarded_net(0.01), [(x, y)], [0.0, 1.0], data_hint=DATA)
    assert DATA in str(exc.value) and exc.value.hint


@pytest.mark.parametrize("stack", [True, False])
def test_sweep_row_that_alone_is_non_finite_is_marked_never_chosen_and_noted(stack):
    x, y = toys.data(32, seed=3)
    model = guarded_net(1.0)
    with torch.no_grad():  # the premise: plain BN is finite, per-example normalization is not
        assert torch.isfinite(model(x)).all()
        assert not torch.isfinite(correct_model(copy.deepcopy(model), 1.0)(x)).all()
    result = sweep_alpha(model, [(x, y)], [0.0, 0.01, 1.0], metric="top1", stack=stack, data_hint=DATA)
    rows = {r.label: r for r in result.rows}
    assert not rows["alpha=1"].finite
    assert rows["EMA"].finite and rows["alpha=0.01"].finite
    for metric in ("nll", "top1", "top5"):
        assert result.best_row(metric).label != "alpha=1"
    assert any("alpha=1" in note and "never chosen" in note for note in result.notes), result.notes
    assert result.as_report()["rows"][-1]["finite"] is False


@pytest.mark.parametrize("stack", [True, False])
def test_sweep_values_too_large_for_float32_statistics(stack):
    x, y = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        sweep_alpha(toys.conv_net(), [(x * 1e30, y)], [0.0, 0.1], stack=stack, data_hint=DATA)
    _expect(exc, "1", "too large")


# ------------------------------------------------------------------- 3. recalibrated statistics finite
@pytest.mark.parametrize("scale", [1e30, 1e20])
@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_recalibrate_huge_values_is_an_error_not_inf(scale, upstream):
    x, _ = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        recalibrate_stats(toys.conv_net(), [(x * scale,)], upstream=upstream, batch_size=4, data_hint=DATA)
    _expect(exc, "1")
    assert "--mean/--std" in str(exc.value.hint)


@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_recalibrate_large_but_representable_values_give_finite_statistics(upstream):
    x, _ = toys.data(16, seed=3)
    result = recalibrate_stats(toys.conv_net(), [(x * 1e15,)], upstream=upstream, batch_size=4)
    for mean, var in result.stats.values():
        assert torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()


def test_recalibrate_command_writes_nothing_for_huge_values(tmp_path):
    from bncorrect import api

    model = toys.conv_net()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    x, y = toys.data(16, seed=3)
    data = tmp_path / "huge.npz"
    np.savez(data, x=(x * 1e30).numpy(), y=y.numpy())
    out = tmp_path / "fixed.pt"
    with pytest.raises(NumericalError) as exc:
        api.recalibrate(weights, data, out=out, device="cpu", arch=f"{toys.__file__}:conv_net")
    assert "layer 1" in str(exc.value) and "huge.npz" in str(exc.value)
    assert not out.exists()


# ------------------------------------------------------------------ 4. track_running_stats=False layers
B = 4


class UntrackedNet(nn.Module):
    """conv -> BN without running statistics -> relu -> conv -> BN2d -> relu -> pool -> fc -> BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.free = nn.BatchNorm2d(5, track_running_stats=False)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.head = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.free(self.conv1(x)))
        h = torch.relu(self.bn(self.conv2(h))).mean((2, 3))
        return self.head(self.fc(h))


def _untracked_net() -> nn.Module:
    net = UntrackedNet()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in (net.bn, net.head):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        net.free.weight.copy_(torch.linspace(0.5, 1.5, 5))  # an affine the grouping must apply too
        net.free.bias.copy_(torch.linspace(-0.3, 0.3, 5))
    return net.eval()


def _by_hand(net: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every BN layer's input in training-mode normalization, the net run group by group (B examples),
    the way it was trained: {"bn": [...], "head": [...]} per group."""
    seen: dict[str, list[torch.Tensor]] = {"bn": [], "head": []}
    with torch.no_grad():
        for g in x.split(B):
            h = F.batch_norm(
                net.conv1(g), None, None, net.free.weight, net.free.bias, True, 0.0, net.free.eps
            )
            a = net.conv2(torch.relu(h))
            seen["bn"].append(a)
            a = F.batch_norm(a, None, None, net.bn.weight, net.bn.bias, True, 0.0, net.bn.eps)
            f = net.fc(torch.relu(a).mean((2, 3)))
            seen["head"].append(f)
    return seen


def test_untracked_layer_normalizes_over_groups_in_estimation():
    net = _untracked_net()
    x, _ = toys.data(32, seed=8)
    batches = [(x[:16],), (x[16:],)]
    before = copy.deepcopy(net.state_dict())
    got = estimate_alpha_beta(net, batches, B, seed=3)

    # the same estimator fed with the inputs of the net run group by group
    inputs = [_by_hand(net, xb) for (xb,) in batches]

    def run_pass(group_sizes, observers):
        for per_batch in inputs:
            for name in ("bn", "head"):
                a = torch.cat(per_batch[name])
                mu_i, var_i = C.example_stats(a)
                mu_b, var_b = C.group_stats(mu_i, var_i, group_sizes[name])
                observers[name](a, mu_i, var_i, mu_b, var_b)
        return 32, 0

    layers = {n: (m.running_mean, m.running_var, m.eps) for n, m in (("bn", net.bn), ("head", net.head))}
    want = estimate_from_pass(layers, {"bn": B, "head": B}, run_pass, B, seed=3)
    step = 0.1 / 3**5  # the grid search's resolution: float rounding may tip it by a point
    for g, w in zip(got.layers, want.layers, strict=True):
        assert g.name == w.name
        assert g.alpha == pytest.approx(w.alpha, abs=2 * step) and g.beta == pytest.approx(
            w.beta, abs=2 * step
        )
        assert g.l_aux == pytest.approx(w.l_aux, rel=1e-4) and g.l_aux_ema == pytest.approx(
            w.l_aux_ema, rel=1e-5
        )
    # the grouping matters: with the untracked layer over whole loader batches the estimates differ
    wrong = estimate_alpha_beta(net, [(x,)], B, seed=3, layer_batch_size={"free": 32})
    assert any(abs(a.l_aux_ema - w.l_aux_ema) > 1e-3 for a, w in zip(wrong.layers, want.layers, strict=True))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert "forward" not in net.free.__dict__


def test_untracked_layer_normalizes_over_groups_in_train_recalibration():
    net = _untracked_net()
    x, _ = toys.data(32, seed=9)
    before = copy.deepcopy(net.state_dict())
    result = recalibrate_stats(net, [(x[:16],), (x[16:],)], upstream="train", batch_size=B)
    seen = _by_hand(net, x)
    for name in ("bn", "head"):
        a = torch.cat(seen[name]).double()
        dims = (0, *range(2, a.dim()))
        mean, var = a.mean(dims), a.var(dims, unbiased=False)
        torch.testing.assert_close(result.stats[name][0].double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.stats[name][1].double(), var, rtol=1e-5, atol=1e-6)
    # the grouping matters: over whole loader batches the downstream statistics differ
    with torch.no_grad():
        whole = net.conv2(torch.relu(net.free(net.conv1(x[:16]))))
    assert not torch.allclose(whole, torch.cat(_by_hand(net, x[:16])["bn"]), atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert "forward" not in net.free.__dict__


class UntrackedReLU(nn.BatchNorm2d):
    """No running statistics and behaviour after normalizing: grouped through its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x)) + 1.0


def test_grouping_is_restored_also_on_failure_and_covers_other_forwards():
    work = correct_model(nn.Sequential(UntrackedReLU(3, track_running_stats=False), nn.BatchNorm2d(3)))
    free = work[0]
    assert list(batch_statistics_layers(work)) == ["0"]
    x, _ = toys.data(8, seed=1)
    with torch.no_grad():
        plain = free(x)
        with grouped_batch_statistics(work, {"0": 2}):
            grouped = free(x)
        torch.testing.assert_close(grouped, torch.cat([free(part) for part in x.split(2)]))
        assert not torch.allclose(grouped, plain)
        with pytest.raises(RuntimeError, match="boom"), grouped_batch_statistics(work, 2):
            raise RuntimeError("boom")
        assert "forward" not in free.__dict__
        torch.testing.assert_close(free(x), plain)

    def fail(_x, *_stats):
        raise NumericalError("stop")

    with pytest.raises(NumericalError, match="stop"):
        training_mode_pass(
            work,
            [(x,)],
            {"1": 2},
            {"1": fail},
            forward_fn=None,
            device=resolve_device("cpu"),
            label="test",
            batch_stat_sizes={"0": 2},
        )
    assert "forward" not in free.__dict__ and corrected_layers(work)["1"].observer is None


# ------------------------------------------------------------------------------------- ONNX twins
def _onnx(model: nn.Module, example: torch.Tensor):
    from bncorrect.onnx_export import _export_legacy
    from bncorrect.onnx_rewrite import match_layers

    proto = _export_legacy(model, (example[:2],), 18, True)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return proto, match_layers(proto, names)


@pytest.fixture(scope="module")
def conv_onnx():
    model = toys.conv_net()
    x, _ = toys.data(4)
    return _onnx(model, x)


def test_onnx_estimate_and_recalibrate_nan_in_the_data(conv_onnx):
    from bncorrect.onnx_passes import estimate_onnx, recalibrate_onnx

    proto, node = conv_onnx
    x, _ = _nan_data()
    with pytest.raises(NumericalError) as exc:
        estimate_onnx(proto, [(x,)], 4, device="cpu", data_hint=DATA)
    _expect(exc, node["1"], "NaN")
    for upstream in ("eval", "train"):
        with pytest.raises(NumericalError) as exc:
            recalibrate_onnx(proto, [(x,)], upstream=upstream, batch_size=4, device="cpu", data_hint=DATA)
        _expect(exc, node["1"], "NaN")


@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_onnx_recalibrate_huge_values(conv_onnx, upstream):
    from bncorrect.onnx_passes import recalibrate_onnx

    proto, node = conv_onnx
    x, _ = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        recalibrate_onnx(proto, [(x * 1e30,)], upstream=upstream, batch_size=4, device="cpu", data_hint=DATA)
    _expect(exc, node["1"])


def test_onnx_sweep_nan_in_the_data_and_huge_values(conv_onnx):
    from bncorrect.onnx_passes import sweep_onnx

    proto, node = conv_onnx
    x, y = _nan_data()
    with pytest.raises(NumericalError) as exc:
        sweep_onnx(proto, [(x, y)], [0.0, 0.1], device="cpu", data_hint=DATA)
    _expect(exc, node["1"], "NaN")
    x, y = toys.data(16, seed=3)
    with pytest.raises(NumericalError) as exc:
        sweep_onnx(proto, [(x * 1e30, y)], [0.0, 0.1], device="cpu", data_hint=DATA)
    _expect(exc, node["1"], "too large")


def test_onnx_sweep_row_that_alone_is_non_finite():
    from bncorrect.onnx_passes import sweep_onnx

    x, y = toys.data(32, seed=3)
    proto, _ = _onnx(guarded_net(1.0), x)
    result = sweep_onnx(proto, [(x, y)], [0.0, 0.01, 1.0], metric="top1", device="cpu", data_hint=DATA)
    rows = {r.label: r for r in result.rows}
    assert not rows["alpha=1"].finite and rows["EMA"].finite and rows["alpha=0.01"].finite
    assert all(result.best_row(m).label != "alpha=1" for m in ("nll", "top1", "top5"))
    assert any("alpha=1" in note for note in result.notes)


def test_onnx_sweep_broken_statistics_name_the_node():
    from bncorrect.onnx_passes import sweep_onnx

    x, y = toys.data(16, seed=3)
    proto, node = _onnx(_broken("nan-var"), x)
    with pytest.raises(NumericalError, match="running_var is NaN in channel 0") as exc:
        sweep_onnx(proto, [(x, y)], [0.0, 0.1], device="cpu", data_hint=DATA)
    assert node["1"] in str(exc.value) and "recalibrate" in str(exc.value.hint)


@pytest.mark.parametrize("upstream", ["eval", "train"])
def test_onnx_recalibrate_repairs_broken_statistics(upstream):
    from bncorrect.onnx_passes import estimate_onnx, recalibrate_onnx

    x, _ = toys.data(32, seed=2)
    batches = [(x[:16],), (x[16:],)]
    broken, node = _onnx(_broken("nan-var"), x)
    intact, _ = _onnx(toys.conv_net(seed=0), x)
    got = recalibrate_onnx(broken, batches, upstream=upstream, batch_size=4, device="cpu")
    want = recalibrate_onnx(intact, batches, upstream=upstream, batch_size=4, device="cpu")
    assert set(got.stats) == set(node.values())
    for name, (mean, var) in want.stats.items():
        torch.testing.assert_close(got.stats[name][0], mean)
        torch.testing.assert_close(got.stats[name][1], var)
    # estimation against the recalibrated statistics works on the broken graph too, without them it is refused
    est = estimate_onnx(broken, batches, 4, running_stats=got.stats, device="cpu")
    assert all(math.isfinite(ly.l_aux) for ly in est.layers)
    with pytest.raises(NumericalError, match="running_var is NaN"):
        estimate_onnx(broken, batches, 4, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("where", range(4))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_observed_finds_one_bad_value_in_any_of_the_statistics(dtype, where, bad):
    """The per-layer check sums the statistics in one reduction: one NaN/Inf anywhere in any of the four
    tensors is found (also +Inf and -Inf together, whose sum is NaN), and finite values whose sum
    overflows are still found finite."""
    from bncorrect.passes import check_observed

    big = torch.finfo(dtype).max
    stats = [torch.full((4, 3), big, dtype=dtype) for _ in range(4)]  # finite, their sum overflows dtype
    x = torch.ones(4, 3, 5, dtype=dtype)
    check_observed("l", x, stats)
    stats[where][1, 2] = bad
    if bad == float("inf"):
        stats[(where + 1) % 4][0, 0] = float("-inf")
    with pytest.raises(NumericalError, match="layer l"):
        check_observed("l", x, stats)

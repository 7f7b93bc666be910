"""tune: the per-layer fit against a brute-force grid, stacking and prefix caching against their plain forms,
the L1 pull, the held-out guard, the seeded stratified split, the held-out numbers against a direct
evaluation, --prior-strength as alpha = 1/(N+1), the test-time-adaptation variance identity, and the CLI on
a sample checkpoint."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect import api, load_corrections
from bncorrect.errors import DataError, UsageError
from bncorrect.layers import CorrectedNorm, coefficients, correct_model
from bncorrect.tune import (
    alpha_from_prior_strength,
    alphas_from_prior_strengths,
    dataset_labels,
    fit_per_layer,
    parse_prior_strengths,
    stratified_split,
)

from . import toys

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_checkpoints" / "mnist1d_b2"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for this module: its passes are small, and on a shared 2-core host a second
    thread waiting for a core costs several times the work (measured: a tune of 240 examples 12.5 s with 2
    threads, 3.0 s with 1, while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- references
def two_bn_net(seed: int = 0) -> nn.Sequential:
    """Conv1d-BN-ReLU-Conv1d-BN-pool-Linear on (N, 2, 8), 3 classes: two BN layers to grid over."""
    net = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm1d(3),
        nn.ReLU(),
        nn.Conv1d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm1d(4),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    net = toys._init(net, seed)
    with torch.no_grad():
        net[7].weight.mul_(4.0)
    return net


def _blend(mu_i, var_i, mu_e, var_e, a, b):
    """DESIGN §2 written out: mu_hat, var_hat."""
    d = mu_i - mu_e
    return mu_e + a * d, b * var_i + (1 - b) * var_e + b * (1 - b) * d * d


def grid_nll(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of two_bn_net for every (alpha1, beta1, alpha2, beta2) on the grid ``values``^4,
    computed directly (no bncorrect code): a (G, G, G, G) tensor."""
    conv1, bn1, conv2, bn2, lin = net[0], net[1], net[3], net[4], net[7]
    g = values.numel()
    a1, b1 = (t.reshape(-1, 1, 1) for t in torch.meshgrid(values, values, indexing="ij"))  # (G*G, 1, 1)
    with torch.no_grad():
        h = conv1(x)  # (N, 3, L)
        mu, var = h.mean(2), h.var(2, unbiased=False)  # (N, 3)
        m1, v1 = _blend(mu[None], var[None], bn1.running_mean, bn1.running_var, a1, b1)  # (G*G, N, 3)
        y1 = bn1.weight[:, None] * (h[None] - m1[..., None]) / torch.sqrt(v1[..., None] + bn1.eps)
        y1 = torch.relu(y1 + bn1.bias[:, None])  # (G*G, N, 3, L)
        h2 = conv2(y1.reshape(-1, 3, x.shape[2])).reshape(g * g, x.shape[0], 4, -1)
        mu2, var2 = h2.mean(3), h2.var(3, unbiased=False)  # (G*G, N, 4)
        a2, b2 = (t.reshape(1, -1, 1, 1) for t in torch.meshgrid(values, values, indexing="ij"))
        m2, v2 = _blend(mu2[:, None], var2[:, None], bn2.running_mean, bn2.running_var, a2, b2)
        pooled = bn2.weight * (mu2[:, None] - m2) / torch.sqrt(v2 + bn2.eps) + bn2.bias  # (GG, GG, N, 4)
        logits = pooled @ lin.weight.T + lin.bias
        logp = torch.log_softmax(logits.double(), -1)
        nll = -logp.gather(-1, y.reshape(1, 1, -1, 1).expand(g * g, g * g, -1, 1)).squeeze(-1).mean(-1)
    return nll.reshape(g, g, g, g)


def reference_nll(model: nn.Module, alpha, beta, x: torch.Tensor, y: torch.Tensor) -> float:
    """One candidate the obvious way: a corrected copy, F.cross_entropy."""
    m = correct_model(copy.deepcopy(model), alpha, beta).eval()
    with torch.no_grad():
        return float(F.cross_entropy(m(x).double(), y))


def sampled_labels(model: nn.Module, x: torch.Tensor, seed: int, alpha=0.0, beta=None) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution with the given correction."""
    m = correct_model(copy.deepcopy(model), alpha, beta).eval()
    with torch.no_grad():
        probs = torch.softmax(m(x).double(), -1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).reshape(-1)


# ------------------------------------------------------------------------------------------- the fit
def test_fit_lands_on_the_brute_force_grid_minimum():
    """Two BN layers, labels drawn from the model corrected with (0.6, 0.3, 0.2, 0.7): full-batch fit of the
    four coefficients against the fitting NLL on an 11^4 grid (step 0.1), computed without bncorrect."""
    net = two_bn_net(seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, 8, generator=g) * 1.3 + 0.4
    truth_a = {"1": torch.tensor(0.6), "4": torch.tensor(0.2)}
    truth_b = {"1": torch.tensor(0.3), "4": torch.tensor(0.7)}
    y = sampled_labels(net, x, seed=1, alpha=truth_a, beta=truth_b)
    values = torch.linspace(0, 1, 11)
    nll = grid_nll(net, x, y, values)
    flat = int(nll.argmin())
    idx = np.unravel_index(flat, nll.shape)
    grid_best = [float(values[i]) for i in idx]
    # the grid reference agrees with bncorrect's layer at a grid point (it computes the same function)
    point = {"1": grid_best[0], "4": grid_best[2]}, {"1": grid_best[1], "4": grid_best[3]}
    assert reference_nll(net, *point, x, y) == pytest.approx(float(nll.min()), abs=1e-5)

    # started where tune starts it, at the best global alpha (alpha = beta = a in both layers): the NLL is
    # not convex in the coefficients (from a = 0 this fit ends in a local minimum near (0, 0.43, 0, 0))
    diagonal = torch.stack([nll[i, i, i, i] for i in range(values.numel())])
    start = float(values[int(diagonal.argmin())])
    fit = fit_per_layer(
        net, [(x, y)], [(x, y)], init_alpha=start, strengths=(0.0,), lr=0.1, max_epochs=100, patience=100,
        device="cpu",
    )  # fmt: skip
    best = fit.best
    got = [float(best.alpha["1"]), float(best.beta["1"]), float(best.alpha["4"]), float(best.beta["4"])]
    fitted = reference_nll(net, best.alpha, best.beta, x, y)
    assert best.monitor_nll == pytest.approx(fitted, abs=1e-5)  # the fit's own NLL is the model's
    assert fitted <= float(nll.min()) + 1e-5  # at least as good as the best grid point
    assert max(abs(a - b) for a, b in zip(got, grid_best, strict=True)) <= 0.1 + 1e-6, (got, grid_best)
    assert fitted < reference_nll(net, 0.0, 0.0, x, y)


def _fit_data(n: int = 96, seed: int = 0):
    model = toys.conv_net(seed=seed)
    x, _ = toys.data(n, seed=seed + 1)
    y = sampled_labels(model, x, seed=seed + 2, alpha=0.3)
    return model, x, y


def test_stacked_strengths_equal_one_strength_at_a_time():
    """Fitting K strengths stacked along the batch axis gives what K separate fits give."""
    model, x, y = _fit_data()
    batches = [(x[i : i + 48], y[i : i + 48]) for i in range(0, 96, 48)]
    kwargs = dict(init_alpha=0.1, strengths=(0.0, 0.05), lr=0.05, max_epochs=6, device="cpu")
    stacked = fit_per_layer(model, batches, batches, **kwargs)
    alone = fit_per_layer(model, batches, batches, stack=False, **kwargs)
    assert stacked.mode.startswith("stacked") and alone.mode.startswith("one strength per forward")
    assert stacked.best.epoch > 0  # the fit moved
    for a, b in zip(stacked.fits, alone.fits, strict=True):
        assert a.epoch == b.epoch
        assert a.monitor_nll == pytest.approx(b.monitor_nll, abs=1e-6)
        for name in a.alpha:
            assert float(a.alpha[name]) == pytest.approx(float(b.alpha[name]), abs=1e-4)
            assert float(a.beta[name]) == pytest.approx(float(b.beta[name]), abs=1e-4)
    assert stacked.fits[0].alpha != stacked.fits[1].alpha  # the strengths really differ


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "one_strength_per_forward"])
def test_in_place_activations_after_the_norm_layers_fit_as_out_of_place_ones(stack):
    """torchvision's blocks apply ReLU(inplace=True) to the norm layer's output: the fit's corrected layer
    must give a tensor the next layer may modify in place (a view made inside the fused layer's autograd
    Function is refused by autograd), with the same result as out-of-place ReLUs."""
    model, x, y = _fit_data()
    in_place = copy.deepcopy(model)
    for i, m in enumerate(in_place):
        if isinstance(m, nn.ReLU):
            in_place[i] = nn.ReLU(inplace=True)
    assert sum(isinstance(m, nn.ReLU) and m.inplace for m in in_place) == 2
    batches = [(x[i : i + 48], y[i : i + 48]) for i in range(0, 96, 48)]
    kwargs = dict(init_alpha=0.1, strengths=(0.0, 0.05), lr=0.05, max_epochs=3, device="cpu", stack=stack)
    want = fit_per_layer(model, batches, batches, **kwargs)
    got = fit_per_layer(in_place, batches, batches, **kwargs)
    assert got.best.epoch > 0
    for a, b in zip(got.fits, want.fits, strict=True):
        assert a.epoch == b.epoch and a.monitor_nll == pytest.approx(b.monitor_nll, abs=1e-9)
        for name in a.alpha:
            assert float(a.alpha[name]) == pytest.approx(float(b.alpha[name]), abs=1e-7)
            assert float(a.beta[name]) == pytest.approx(float(b.beta[name]), abs=1e-7)


def test_a_strength_that_stops_leaves_the_stack_and_the_others_run_on_unchanged():
    """A strength so strong that it stops after `patience` epochs leaves the stacked pass; the strength
    still running fits exactly as if it had been fitted alone, and the stopped one's kept snapshot is the one
    from before it stopped (a mix-up of which rows belong to which set would break both)."""
    model, x, y = _fit_data()
    batches = [(x[i : i + 48], y[i : i + 48]) for i in range(0, 96, 48)]
    kwargs = dict(init_alpha=0.1, lr=0.05, max_epochs=8, device="cpu")
    both = fit_per_layer(model, batches, batches, strengths=(0.0, 50.0), **kwargs)
    alone = fit_per_layer(model, batches, batches, strengths=(0.0,), **kwargs)
    weak, strong = both.fits
    assert strong.epoch < weak.epoch == alone.fits[0].epoch  # the strong pull stopped first
    assert weak.monitor_nll == pytest.approx(alone.fits[0].monitor_nll, abs=1e-6)
    for name in weak.alpha:
        assert float(weak.alpha[name]) == pytest.approx(float(alone.fits[0].alpha[name]), abs=1e-4)
        assert float(weak.beta[name]) == pytest.approx(float(alone.fits[0].beta[name]), abs=1e-4)
    # the stopped set as returned is its snapshot: its monitor NLL is the best it reached, not worse
    assert strong.monitor_nll <= strong.start_monitor_nll + 1e-9


class Wrapped(nn.Module):
    """conv_net behind a plain forward: no sequential prefix to cut, no prefix cache."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_prefix_cache_changes_nothing_but_the_cost():
    model, x, y = _fit_data(seed=1)
    batches, monitor = [(x[:64], y[:64])], [(x[64:], y[64:])]
    kwargs = dict(init_alpha=0.05, strengths=(0.0, 0.01), lr=0.05, max_epochs=5, device="cpu")
    cut = fit_per_layer(model, batches, monitor, **kwargs)
    whole = fit_per_layer(Wrapped(model), batches, monitor, **kwargs)
    assert "prefix" in cut.mode and "before the first BN" in cut.cache
    assert "prefix" not in whole.mode and whole.cache.startswith("examples in memory")
    for a, b in zip(cut.fits, whole.fits, strict=True):
        for name in a.alpha:
            assert float(a.alpha[name]) == pytest.approx(float(b.alpha["inner." + name]), abs=1e-4)
            assert float(a.beta[name]) == pytest.approx(float(b.beta["inner." + name]), abs=1e-4)
    streamed = fit_per_layer(model, batches, monitor, cache_bytes=16, **kwargs)  # nothing fits in memory
    assert streamed.cache.startswith("streamed")
    for a, b in zip(cut.fits, streamed.fits, strict=True):
        assert all(float(a.alpha[n]) == pytest.approx(float(b.alpha[n]), abs=1e-4) for n in a.alpha)


def test_strong_l1_pull_leaves_plain_bn_and_per_channel_vectors():
    model, x, y = _fit_data(seed=2)
    batches, monitor = [(x[:64], y[:64])], [(x[64:], y[64:])]
    fit = fit_per_layer(
        model, batches, monitor, init_alpha=0.2, strengths=(0.0, 50.0), per_channel=True, lr=0.1,
        max_epochs=8, patience=8, device="cpu",
    )  # fmt: skip
    free, pulled = fit.fits
    assert pulled.zero_layers == list(pulled.alpha)  # every layer back to alpha = beta = 0
    assert all(not bool(pulled.alpha[n].any()) and not bool(pulled.beta[n].any()) for n in pulled.alpha)
    assert all(t.shape == (model[int(n)].num_features,) for n, t in free.alpha.items())
    assert all(
        float(t.min()) >= 0.0 and float(t.max()) <= 1.0 for t in (*free.alpha.values(), *free.beta.values())
    )


@pytest.mark.parametrize("spatial", [(3, 2), (5,), ()])
@pytest.mark.parametrize("fan_out", [False, True])
@pytest.mark.parametrize("sets", [None, (0, 2)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_stacked_layer_equals_the_op_by_op_layer(spatial, fan_out, sets, per_channel, monkeypatch):
    """The stacked layer as one autograd node (_StackedNormFn) against the same layer through autograd op by
    op (``_FitNorm.fused = False``): outputs and the gradients for x, alpha and beta, in float64, for
    (N, C, H, W), (N, C, L) and (N, C) inputs, the fan-out of the first BN layer, a subset of the sets and
    per-channel coefficients; and against finite differences."""
    from bncorrect.tune import _FitNorm, _StackedNormFn

    g = torch.Generator().manual_seed(len(spatial) + 2 * fan_out + 4 * per_channel)
    c, m, k_all = 3, 2, 3
    bn = (nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d)[2 - len(spatial)](c).double().eval()
    with torch.no_grad():
        for t in (bn.running_mean, bn.weight, bn.bias):
            t.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    bn.requires_grad_(False)
    layer = _FitNorm(bn, "direct", k_all, c if per_channel else 1, 0.2, 0.3)
    with torch.no_grad():
        layer.alpha.copy_(torch.rand(layer.alpha.shape, generator=g, dtype=torch.float64))
        layer.beta.copy_(torch.rand(layer.beta.shape, generator=g, dtype=torch.float64))
    active = None if sets is None else torch.tensor(sets)
    k = k_all if sets is None else len(sets)
    layer.active, layer.stack = active, (k, m, fan_out)
    x = torch.randn((m if fan_out else k * m), c, *spatial, generator=g, dtype=torch.float64) * 2 + 0.5
    x.requires_grad_(True)
    w = torch.randn(k * m, c, *spatial, generator=g, dtype=torch.float64)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(_FitNorm, "fused", fused)
        y = layer(x)
        results.append((y.detach(), *torch.autograd.grad((y * w).sum(), (x, layer.alpha, layer.beta))))
    for got, want in zip(*results, strict=True):
        assert float((got - want).abs().max()) <= 1e-10
    if sets is not None:  # the sets left out get no gradient
        left_out = [i for i in range(k_all) if i not in sets]
        assert not results[0][2][left_out].any() and not results[0][3][left_out].any()
    assert torch.autograd.gradcheck(
        lambda x, a, b: _StackedNormFn.apply(x, a, b, active, k, m, bn), (x, layer.alpha, layer.beta)
    )


def _reference_fit(net, x, y, xm, ym, strength, start, lr, epochs, patience):
    """fit_per_layer for two_bn_net written out for one strength on one batch per epoch: the corrected
    layers from DESIGN §2 (_blend), Adam (b1 0.9, b2 0.999, eps 1e-8) with a cosine-decayed rate, the
    projection onto [0, 1], loss = cross-entropy + strength * (a1 + b1 + a2 + b2), early stopping on the
    monitor batch, coefficients below 1e-4 set to 0."""
    conv1, bn1, conv2, bn2, lin = net[0], net[1], net[3], net[4], net[7]

    def logits(inp, coef):
        a1, b1, a2, b2 = coef
        h = conv1(inp)
        m1, v1 = _blend(h.mean(2), h.var(2, unbiased=False), bn1.running_mean, bn1.running_var, a1, b1)
        h = torch.relu(bn1.weight[:, None] * (h - m1[..., None]) / torch.sqrt(v1[..., None] + bn1.eps)
                       + bn1.bias[:, None])  # fmt: skip
        h = conv2(h)
        m2, v2 = _blend(h.mean(2), h.var(2, unbiased=False), bn2.running_mean, bn2.running_var, a2, b2)
        h = (
            bn2.weight[:, None] * (h - m2[..., None]) / torch.sqrt(v2[..., None] + bn2.eps)
            + bn2.bias[:, None]
        )
        return lin(h.mean(2))

    coef = torch.full((4,), float(start), requires_grad=True)
    m_, v_ = torch.zeros(4), torch.zeros(4)
    with torch.no_grad():
        best, best_nll, best_epoch = coef.detach().clone(), float(F.cross_entropy(logits(xm, coef), ym)), 0
    since = 0
    for epoch in range(1, epochs + 1):
        loss = F.cross_entropy(logits(x, coef), y) + strength * coef.sum()
        (grad,) = torch.autograd.grad(loss, coef)
        t = epoch  # one step per epoch
        rate = lr * 0.5 * (1 + math.cos(math.pi * (t - 1) / epochs))
        with torch.no_grad():
            m_ = 0.9 * m_ + 0.1 * grad
            v_ = 0.999 * v_ + 0.001 * grad * grad
            coef -= rate / (1 - 0.9**t) * m_ / (torch.sqrt(v_ / (1 - 0.999**t)) + 1e-8)
            coef.clamp_(0.0, 1.0)
            nll = float(F.cross_entropy(logits(xm, coef), ym))
        if nll < best_nll - 1e-9:
            best, best_nll, best_epoch, since = coef.detach().clone(), nll, epoch, 0
        else:
            since += 1
            if since >= patience:
                break
    best = torch.where(best < 1e-4, torch.zeros_like(best), best)
    return best, best_epoch


def test_fit_equals_a_written_out_reference_fit():
    """fit_per_layer (stacked strengths, prefix cache, the fused layer, the L1 gradient added as its constant,
    the kept monitor scores) against the fit written out for each strength alone."""
    net = two_bn_net(seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(160, 2, 8, generator=g) * 1.3 + 0.4
    y = sampled_labels(net, x, seed=6, alpha=0.35)
    fit_b, mon_b = (x[:112], y[:112]), (x[112:], y[112:])
    strengths, scale = (0.0, 0.02, 2.0), 0.5
    fit = fit_per_layer(
        net, [fit_b], [mon_b], init_alpha=0.1, strengths=strengths, nll_scale=scale, lr=0.05, max_epochs=8,
        patience=2, device="cpu",
    )  # fmt: skip
    assert fit.mode.startswith("stacked, prefix")
    for strength, got in zip(strengths, fit.fits, strict=True):
        want, epoch = _reference_fit(net, *fit_b, *mon_b, strength * scale, 0.1, 0.05, 8, 2)
        coef = torch.stack([got.alpha["1"], got.beta["1"], got.alpha["4"], got.beta["4"]])
        assert got.epoch == epoch, (strength, got.epoch, epoch)
        assert float((coef - want).abs().max()) <= 1e-4, (strength, coef, want)
        assert got.monitor_nll == pytest.approx(reference_nll(net, *_coef_maps(coef), *mon_b), abs=1e-5)
        assert got.start_monitor_nll == pytest.approx(reference_nll(net, 0.1, 0.1, *mon_b), abs=1e-5)
    assert [f.epoch for f in fit.fits] != [0, 0, 0] and fit.fits[2].epoch != fit.fits[0].epoch


def test_monitor_nll_of_what_the_snap_changed_is_measured_again(monkeypatch):
    """The returned monitor NLL of a set is the one kept with its snapshot unless the snap to 0 changed the
    set; then it is measured again: with a snap threshold of 0.12 some coefficients change, and every set's
    returned NLL is that of its returned coefficients, computed directly."""
    from bncorrect import tune

    net = two_bn_net(seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(160, 2, 8, generator=g) * 1.3 + 0.4
    y = sampled_labels(net, x, seed=6, alpha=0.35)
    monkeypatch.setattr(tune, "ZERO_SNAP", 0.12)
    fit = fit_per_layer(
        net, [(x[:112], y[:112])], [(x[112:], y[112:])], init_alpha=0.1, strengths=(0.0, 0.02, 2.0),
        nll_scale=0.5, lr=0.05, max_epochs=8, patience=2, device="cpu",
    )  # fmt: skip
    zeroed = [f for f in fit.fits if any(float(v) == 0.0 for v in (*f.alpha.values(), *f.beta.values()))]
    assert zeroed  # the snap changed at least one set
    for f in fit.fits:
        assert f.monitor_nll == pytest.approx(reference_nll(net, f.alpha, f.beta, x[112:], y[112:]), abs=1e-5)


def _coef_maps(coef):
    return {"1": coef[0], "4": coef[2]}, {"1": coef[1], "4": coef[3]}


# ------------------------------------------------------------------------------------------- the split
def test_stratified_split_is_seeded_and_stratified():
    y = torch.tensor([0] * 50 + [1] * 31 + [2] * 7 + [3] * 1 + [4] * 11)[torch.randperm(100)]
    rest, part = stratified_split(y, 0.3, seed=5)
    assert len(part) == 30 and len(rest) == 70
    assert sorted(torch.cat([rest, part]).tolist()) == list(range(100))
    for c in range(5):
        n_c = int((y == c).sum())
        k_c = int((y[part] == c).sum())
        assert math.floor(0.3 * n_c) <= k_c <= math.ceil(0.3 * n_c)
    again = stratified_split(y, 0.3, seed=5)
    assert torch.equal(again[0], rest) and torch.equal(again[1], part)
    other = stratified_split(y, 0.3, seed=6)
    assert not torch.equal(other[1], part)
    assert bool((part[1:] > part[:-1]).all())  # sorted


def test_dataset_labels_and_refusals(tmp_path):
    x, y = toys.data(20)
    assert torch.equal(dataset_labels(api.open_data((x, y))), y)
    with pytest.raises(DataError, match="needs labels"):
        dataset_labels(api.open_data(x))
    masks = torch.zeros(20, 8, 8, dtype=torch.long)
    assert torch.equal(dataset_labels(api.open_data((x, masks))), masks)  # segmentation: the masks
    with pytest.raises(DataError, match=r"\(N, H, W\)"):
        dataset_labels(api.open_data((x, torch.zeros(20, 8, dtype=torch.long))))
    with pytest.raises(UsageError, match="cannot index"):
        dataset_labels(iter([(x, y)]))


# ------------------------------------------------------------------------------------------- tune
def test_guard_writes_ema_when_the_fit_overfits(tmp_path):
    """Labels drawn from plain BN's own predictions, a fitting part of 30 examples: every correction fitted
    there is worse than EMA on the 270 held-out examples, so EMA is written and the notes say why."""
    model = toys.conv_net(seed=4)
    x, _ = toys.data(300, seed=5)
    y = sampled_labels(model, x, seed=6)
    out = tmp_path / "guarded.safetensors"
    outcome = api.tune(model, (x, y), 2, holdout=0.9, device="cpu", out=out, max_epochs=15)
    result = outcome.report["tune"]
    assert (result.n_fit, result.n_heldout) == (30, 270)
    assert result.chosen.kind == "ema"
    ema = result.ema.heldout
    assert all(r.heldout.nll >= ema.nll for r in result.rows)
    assert any("EMA written" in note for note in result.notes)
    tuned = result.tuned
    assert tuned.fit["nll"] < result.ema.fit["nll"] and tuned.heldout.nll > ema.nll  # overfitting, visible
    corr = load_corrections(out)
    assert corr.method.startswith("tune (ema")
    assert all(float(lc.alpha) == float(lc.beta) == 0.0 for lc in corr.layers.values())


def test_heldout_numbers_are_the_candidates_on_the_heldout_examples():
    """Every row's held-out NLL and top-1 equal a direct evaluation of its coefficients on exactly the
    held-out examples; the fitting part and the held-out part are disjoint and stratified."""
    model = toys.conv_net(seed=7)
    x, _ = toys.data(160, seed=8)
    y = sampled_labels(model, x, seed=9, alpha=0.3)
    result = api.tune(model, (x, y), 2, holdout=0.4, seed=3, device="cpu", max_epochs=4).report["tune"]
    held = torch.tensor(result.heldout_indices)
    fit = torch.tensor(result.fit_indices)
    assert len(held) == 64 and len(fit) == 96 and not set(held.tolist()) & set(fit.tolist())
    assert set(result.monitor_indices) <= set(fit.tolist())
    for row in result.rows:
        coeffs = result.coefficients(row.kind)
        alpha = {n: a for n, (a, _) in coeffs.items()}
        beta = {n: b for n, (_, b) in coeffs.items()}
        stats = result.running_stats(row.kind)  # EvalNorm after recalibration: its own statistics
        base = model if stats is None else _set_stats(copy.deepcopy(model), stats)
        assert row.heldout.nll == pytest.approx(reference_nll(base, alpha, beta, x[held], y[held]), abs=1e-5)
        assert row.fit["nll"] == pytest.approx(reference_nll(base, alpha, beta, x[fit], y[fit]), abs=1e-5)
        m = correct_model(copy.deepcopy(base), alpha, beta).eval()
        with torch.no_grad():
            top1 = float((m(x[held]).argmax(1) == y[held]).double().mean())
        assert row.heldout.top1 == pytest.approx(top1, abs=1e-12)
    assert result.chosen is min(result.rows, key=lambda r: (r.heldout.nll, -r.heldout.top1))
    assert result.chosen.heldout.nll <= result.ema.heldout.nll


def test_tune_refuses_bad_options(tmp_path):
    x, y = toys.data(40)
    with pytest.raises(UsageError, match="holdout"):
        api.tune(toys.conv_net(), (x, y), 2, holdout=1.0, device="cpu")
    with pytest.raises(UsageError, match="metric"):
        api.tune(toys.conv_net(), (x, y), 2, metric="miou", device="cpu")
    with pytest.raises(DataError, match="fitting examples"):
        api.tune(toys.conv_net(), (x[:4], y[:4]), 2, device="cpu")


# ------------------------------------------------------------------------------------------- prior strength
def test_prior_strength_is_alpha_one_over_n_plus_one(cli, toy_files):
    assert alpha_from_prior_strength(3) == 0.25 and alpha_from_prior_strength(0) == 1.0
    assert parse_prior_strengths("0,1,3") == [0.0, 1.0, 3.0]
    assert alphas_from_prior_strengths([3, 1, 0, 3]) == [0.25, 0.5, 1.0]
    with pytest.raises(UsageError, match="prior"):
        alpha_from_prior_strength(-1)
    by_n = api.weight(toys.conv_net(), prior_strength=3)
    by_alpha = api.weight(toys.conv_net(), 0.25)
    got, want = coefficients(by_n.model), coefficients(by_alpha.model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1]) for n in got)
    assert all(float(lc.alpha) == float(lc.beta) == 0.25 for lc in by_n.corrections.layers.values())
    with pytest.raises(UsageError, match="both given"):
        api.weight(toys.conv_net(), 0.25, prior_strength=3)

    load = ("--arch", toy_files["arch"])
    a, b = toy_files["dir"] / "n.safetensors", toy_files["dir"] / "a.safetensors"
    assert cli("weight", toy_files["state_dict"], *load, "--prior-strength", 3, "-o", a).code == 0
    assert cli("weight", toy_files["state_dict"], *load, "--alpha", 0.25, "-o", b).code == 0
    ca, cb = load_corrections(a), load_corrections(b)
    assert ca.coefficients()[0].keys() == cb.coefficients()[0].keys()
    for name in ca.layers:
        assert torch.equal(ca.layers[name].alpha, cb.layers[name].alpha)
        assert torch.equal(ca.layers[name].beta, cb.layers[name].beta)
    bad = cli("weight", toy_files["state_dict"], *load, "--prior-strength", 3, "--alpha", 0.2)
    assert bad.code != 0 and "both given" in bad.err
    report = toy_files["dir"] / "sweep.json"
    res = cli("sweep-alpha", toy_files["state_dict"], *load, "--data", toy_files["data"],
              "--prior-strengths", "0,1,3", "--report", report, "--device", "cpu")  # fmt: skip
    assert res.code == 0, res.err
    assert sorted(r["alpha"] for r in json.loads(report.read_text())["rows"]) == [0.0, 0.25, 0.5, 1.0]


def test_tta_variance_identity():
    """alpha = beta = 1/(N+1) gives test-time BN adaptation's mean exactly and its variance plus
    beta (1 - beta) d^2, which is the variance of the mixture of the population (weight N/(N+1)) and the
    example's values (weight 1/(N+1)) about the mixture's mean."""
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.3, 4.0]))
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
    bn = bn.double().eval()
    for n in (0, 1, 3, 7.5, 100):
        w = alpha_from_prior_strength(n)
        layer = CorrectedNorm(bn, w, w).eval()
        mean, var = layer.normalization_stats(x)
        mu_i, var_i = x.mean((2, 3)), x.var((2, 3), unbiased=False)
        mu_e, var_e = bn.running_mean, bn.running_var
        mu_tta = (n * mu_e + mu_i) / (n + 1)
        var_tta = (n * var_e + var_i) / (n + 1)
        d = mu_i - mu_e
        torch.testing.assert_close(mean, mu_tta, rtol=0, atol=1e-12)
        torch.testing.assert_close(var, var_tta + w * (1 - w) * d * d, rtol=0, atol=1e-12)
        torch.testing.assert_close(var, var_tta + n * d * d / (n + 1) ** 2, rtol=0, atol=1e-12)
        # the mixture: E-population values with exactly mean mu_E and variance var_E (two points
        # mu_E +- sigma_E), weight 1 - w; the example's 25 values, weight w
        for i in range(x.shape[0]):
            for c in range(3):
                s = float(var_e[c]) ** 0.5
                pop = torch.tensor([float(mu_e[c]) - s, float(mu_e[c]) + s], dtype=torch.float64)
                own = x[i, c].reshape(-1)
                values = torch.cat([pop, own])
                weights = torch.cat(
                    [
                        torch.full((2,), (1 - w) / 2, dtype=torch.float64),
                        torch.full((own.numel(),), w / own.numel(), dtype=torch.float64),
                    ]
                )
                m = (weights * values).sum()
                v = (weights * (values - m) ** 2).sum()
                assert float(m) == pytest.approx(float(mean[i, c]), abs=1e-12)
                assert float(v) == pytest.approx(float(var[i, c]), abs=1e-12)


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_tune_end_to_end_on_the_sample(cli, tmp_path):
    out, report, plot = tmp_path / "tuned.safetensors", tmp_path / "tune.json", tmp_path / "tune.png"
    res = cli(
        "tune", SAMPLE / "model.pt", "--data", SAMPLE / "val.npz", "-B", 2, "--max-examples", 240,
        "--max-epochs", 4, "--strengths", "0,0.01", "--device", "cpu", "-o", out, "--report", report,
        "--plot", plot, "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["output"] == str(out)
    saved = json.loads(report.read_text())
    for key in ("metric", "n_examples", "n_fit", "n_heldout", "chosen", "rows", "layers", "strengths",
                "n_zero_layers", "notes", "global_alpha", "fit"):  # fmt: skip
        assert key in saved and key in data
    assert saved["n_examples"] == 240 and saved["n_fit"] + saved["n_heldout"] == 240
    kinds = ["ema", "rule", "global", "evalnorm", "evalnorm-recal", "tuned"]
    assert [r["kind"] for r in saved["rows"]] == kinds
    for r in saved["rows"]:
        assert {"nll", "top1", "top5"} <= set(r["fit"]) and {"nll", "top1", "top5"} <= set(r["heldout"])
    assert [ly["name"] for ly in saved["layers"]] == [f"features.{i}.1" for i in range(4)]
    assert all(
        {"alpha", "beta", "evalnorm_alpha", "evalnorm_beta", "plain"} <= set(ly) for ly in saved["layers"]
    )
    assert saved["chosen"]["heldout"]["nll"] <= saved["rows"][0]["heldout"]["nll"]
    corr = load_corrections(out)
    assert corr.method.startswith("tune (") and set(corr.layers) == {ly["name"] for ly in saved["layers"]}
    chosen = {ly["name"]: (ly["chosen_alpha"], ly["chosen_beta"]) for ly in saved["layers"]}
    for name, lc in corr.layers.items():
        assert float(lc.alpha) == pytest.approx(chosen[name][0]) and float(lc.beta) == pytest.approx(
            chosen[name][1]
        )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    help_text = cli("tune", "--help")
    assert help_text.code == 0 and "--holdout" in help_text.out and "--per-channel" in help_text.out


def test_detection_outputs_are_refused_before_any_pass(tmp_path):
    """A model returning per-image detection dicts has no class scores to tune on: one UsageError, raised
    before the first data pass (no progress reported) and nothing written."""
    x, y = toys.data(24, seed=11)
    calls: list[tuple] = []
    out = tmp_path / "det.safetensors"
    with pytest.raises(UsageError, match="object detections"):
        api.tune(toys.TinyDetector(seed=0).eval(), (x, y), 2, device="cpu", out=out,
                 progress=lambda *a: calls.append(a))
    assert calls == [] and not out.exists()
    with pytest.raises(UsageError, match=r"output.key"):  # a wrong key, also before any pass
        api.tune(toys.conv_net(), (x, y), 2, device="cpu", output_key="logits",
                 progress=lambda *a: calls.append(a))
    assert calls == []


# ------------------------------------------------------------------------------------------- EvalNorm x 2
TOYS = Path(__file__).resolve().parent / "toys.py"


def _set_stats(model: nn.Module, stats) -> nn.Module:
    """Running statistics replaced by hand (plain torch buffers)."""
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            bn = model.get_submodule(name)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return model


def stale_stats_case(tmp_path: Path):
    """conv_net whose running statistics are stale (variances x3, means + 0.5) while the labels come from
    the same network with its exact population statistics: recalibration is what helps. Saved as a state
    dict for ``--arch tests/toys.py:conv_net``."""
    from bncorrect.recalibration import recalibrate_stats

    true = toys.conv_net(seed=4)
    x, _ = toys.data(200, seed=5)
    _set_stats(true, recalibrate_stats(true, [(x,)], upstream="eval", exact=True).stats)
    with torch.no_grad():
        true[10].weight.mul_(3.0)  # sharper labels (the last BN's gamma: the statistics do not change)
    y = sampled_labels(true, x, seed=6)
    stale = copy.deepcopy(true)
    with torch.no_grad():
        for m in stale.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.mul_(3.0)
                m.running_mean.add_(0.5)
    weights = tmp_path / "stale.pt"
    torch.save(stale.state_dict(), weights)
    return stale, weights, x, y


def train_consistent_reference(model: nn.Module, x: torch.Tensor, b: int, seed: int, batch: int):
    """recalibrate_stats(upstream='train') over the fitting examples in the order tune's loader reads them:
    a permutation seeded with ``seed``, cut into batches of ``batch``."""
    from bncorrect.recalibration import recalibrate_stats

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    xs = x[order]
    batches = [(xs[i : i + batch],) for i in range(0, len(xs), batch)]
    return recalibrate_stats(model, batches, upstream="train", batch_size=b).stats


def test_both_evalnorm_candidates_rescored_and_the_recalibrated_one_written(tmp_path):
    """EvalNorm offline with and without recalibration are both rows; each one's held-out NLL equals a
    direct evaluation of the coefficients in the written report (the recalibrated one on statistics from a
    direct recalibrate_stats call, which equal the candidate's); it is chosen here, and the written .pt and
    .onnx reproduce its held-out NLL with those statistics in place of the running ones."""
    import onnxruntime as ort

    import bncorrect

    stale, weights, x, y = stale_stats_case(tmp_path)
    arch = f"{TOYS}:conv_net"
    b, seed = 8, 0
    out_pt, report = tmp_path / "tuned.pt", tmp_path / "tune.json"
    result = api.tune(
        weights, (x, y), b, arch=arch, holdout=0.4, seed=seed, device="cpu", max_epochs=4, out=out_pt,
        report=report,
    ).report["tune"]  # fmt: skip
    saved = json.loads(report.read_text())
    kinds = [r["kind"] for r in saved["rows"]]
    assert kinds == ["ema", "rule", "global", "evalnorm", "evalnorm-recal", "tuned"]
    assert saved["recalibrated"] == "train" and saved["rows"][4]["recalibrated"] is True
    assert not any(r["recalibrated"] for i, r in enumerate(saved["rows"]) if i != 4)
    fit, held = torch.tensor(result.fit_indices), torch.tensor(result.heldout_indices)

    # the recalibrated statistics: a direct call on the fitting part (tune's loader batch: 8 * 8 = 64)
    direct = train_consistent_reference(stale, x[fit], b, seed, 64)
    cand = result.running_stats("evalnorm-recal")
    assert cand is not None and set(cand) == set(direct) == {"1", "5", "10"}
    for name, (mean, var) in direct.items():
        torch.testing.assert_close(cand[name][0], mean, rtol=0, atol=0)
        torch.testing.assert_close(cand[name][1], var, rtol=0, atol=0)
    assert result.running_stats("evalnorm") is None

    # both EvalNorm rows re-scored from the report's per-layer coefficients
    layers = {ly["name"]: ly for ly in saved["layers"]}
    plain_a = {n: ly["evalnorm_alpha"] for n, ly in layers.items()}
    plain_b = {n: ly["evalnorm_beta"] for n, ly in layers.items()}
    recal_a = {n: ly["evalnorm_recal_alpha"] for n, ly in layers.items()}
    recal_b = {n: ly["evalnorm_recal_beta"] for n, ly in layers.items()}
    assert plain_a != recal_a  # two estimates, on two sets of statistics
    by_kind = {r["kind"]: r for r in saved["rows"]}
    recal_model = _set_stats(copy.deepcopy(stale), direct)
    want_plain = reference_nll(stale, plain_a, plain_b, x[held], y[held])
    want_recal = reference_nll(recal_model, recal_a, recal_b, x[held], y[held])
    assert by_kind["evalnorm"]["heldout"]["nll"] == pytest.approx(want_plain, abs=1e-5)
    assert by_kind["evalnorm-recal"]["heldout"]["nll"] == pytest.approx(want_recal, abs=1e-5)
    assert by_kind["evalnorm-recal"]["fit"]["nll"] == pytest.approx(
        reference_nll(recal_model, recal_a, recal_b, x[fit], y[fit]), abs=1e-5
    )

    # chosen (stale statistics: recalibration is what helps), and written with its statistics
    assert result.chosen.kind == "evalnorm-recal" and saved["chosen"]["kind"] == "evalnorm-recal"
    assert want_recal < min(r["heldout"]["nll"] for r in saved["rows"] if r["kind"] != "evalnorm-recal")
    loaded = bncorrect.load(out_pt, arch=arch).eval()
    for name, (mean, var) in direct.items():
        bn = loaded.get_submodule(name)
        inner = getattr(bn, "norm", bn)
        torch.testing.assert_close(inner.running_mean, mean, rtol=0, atol=0)
        torch.testing.assert_close(inner.running_var, var, rtol=0, atol=0)
    with torch.no_grad():
        got = float(F.cross_entropy(loaded(x[held]).double(), y[held]))
    assert got == pytest.approx(want_recal, abs=1e-5)

    out_onnx, out_st = tmp_path / "tuned.onnx", tmp_path / "tuned.safetensors"
    api.tune(weights, (x, y), b, arch=arch, holdout=0.4, seed=seed, device="cpu", max_epochs=4, out=out_onnx)
    sess = ort.InferenceSession(str(out_onnx), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x[held].numpy()})[0])
    assert float(F.cross_entropy(logits.double(), y[held])) == pytest.approx(want_recal, abs=1e-4)
    api.tune(weights, (x, y), b, arch=arch, holdout=0.4, seed=seed, device="cpu", max_epochs=4, out=out_st)
    corr = load_corrections(out_st)
    assert corr.method.startswith("tune (evalnorm-recal")
    for name, (mean, var) in direct.items():
        torch.testing.assert_close(corr.layers[name].running_mean, mean, rtol=0, atol=0)
        torch.testing.assert_close(corr.layers[name].running_var, var, rtol=0, atol=0)
        assert float(corr.layers[name].alpha) == pytest.approx(recal_a[name])


def test_recalibrated_candidate_eval_upstream_and_leaving_it_out():
    """upstream='eval': the candidate's statistics are the exact inference-consistent population statistics
    of the fitting part (a direct recalibrate_stats call, exact scheme); recalibrate=False leaves the
    candidate out; recalibrate=True as the old opt-in still runs, with a note of what it means now."""
    from bncorrect.recalibration import recalibrate_stats

    model = toys.conv_net(seed=7)
    x, _ = toys.data(160, seed=8)
    y = sampled_labels(model, x, seed=9, alpha=0.3)
    kw = dict(holdout=0.4, seed=3, device="cpu", max_epochs=2)
    result = api.tune(model, (x, y), 2, upstream="eval", **kw).report["tune"]
    fit = torch.tensor(result.fit_indices)
    direct = recalibrate_stats(model, [(x[fit],)], upstream="eval", exact=True).stats
    assert result.recalibrated == "eval"
    assert result.row("evalnorm-recal").label.endswith("(recalibrated, eval)")
    for name, (mean, var) in direct.items():
        got_mean, got_var = result.running_stats("evalnorm-recal")[name]
        torch.testing.assert_close(got_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_var, var, rtol=1e-5, atol=1e-6)
    assert not any("default now" in n for n in result.notes)

    without = api.tune(model, (x, y), 2, recalibrate=False, **kw).report["tune"]
    assert [r.kind for r in without.rows] == ["ema", "rule", "global", "evalnorm", "tuned"]
    assert without.recalibrated is None and not without.has("evalnorm-recal")
    assert "evalnorm_recal_alpha" not in without.as_report()["layers"][0]
    # the rows both runs share are the same candidates, scored the same
    for kind in ("ema", "rule", "global", "evalnorm"):
        assert without.row(kind).heldout.nll == pytest.approx(result.row(kind).heldout.nll, abs=1e-9)

    legacy = api.tune(model, (x, y), 2, recalibrate=True, **kw).report["tune"]
    assert legacy.has("evalnorm") and legacy.has("evalnorm-recal") and legacy.recalibrated == "train"
    assert any("recalibrate=True is the default now" in n and "upstream='eval'" in n for n in legacy.notes)


def test_cli_recalibrate_options(cli, toy_files):
    """--no-recalibrate leaves the candidate out; the old --recalibrate is accepted and says what it
    means now; --upstream must be eval or train."""
    base = ["tune", toy_files["state_dict"], "--arch", toy_files["arch"], "--data", toy_files["data"], "-B",
            2, "--max-epochs", 2, "--device", "cpu", "--json"]  # fmt: skip
    res = cli(*base, "--no-recalibrate")
    assert res.code == 0, res.err
    assert [r["kind"] for r in json.loads(res.out)["rows"]] == ["ema", "rule", "global", "evalnorm", "tuned"]
    res = cli(*base, "--recalibrate")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert "evalnorm-recal" in [r["kind"] for r in data["rows"]] and data["recalibrated"] == "train"
    assert any("--recalibrate is the default now" in n and "--upstream eval" in n for n in data["notes"])
    res = cli(*base, "--upstream", "sideways")
    assert res.code != 0 and "--upstream sideways" in res.err and "Traceback" not in res.err


def test_estimate_pair_equals_two_separate_estimates():
    """Both EvalNorm estimates from one training-mode pass give exactly what two estimate_alpha_beta calls
    give: on the model, and on the model with the other statistics in its buffers (same batches, seed)."""
    from bncorrect.estimation import estimate_alpha_beta
    from bncorrect.recalibration import recalibrate_stats
    from bncorrect.tune import estimate_pair

    model = toys.conv_net(seed=2)
    x, _ = toys.data(96, seed=3)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(4))
    batches = [(x[order[i : i + 32]],) for i in range(0, 96, 32)]
    stats = recalibrate_stats(model, batches, upstream="train", batch_size=4).stats
    plain, other = estimate_pair(model, stats, batches, 4, seed=5, solve_rows=512)
    alone = estimate_alpha_beta(model, batches, 4, seed=5, solve_rows=512)
    moved = estimate_alpha_beta(_set_stats(copy.deepcopy(model), stats), batches, 4, seed=5, solve_rows=512)
    for got, want in ((plain, alone), (other, moved)):
        assert (got.examples, got.dropped) == (want.examples, want.dropped) == (96, 0)
        assert [ly.as_dict() for ly in got.layers] == [ly.as_dict() for ly in want.layers]
    assert plain.alpha() != other.alpha()  # the statistics matter to the solve

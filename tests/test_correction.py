from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bncorrect import correction as C

from .reference import corrected_bn_reference, example_weighing_ex2_reference, l_aux_reference

SHAPES = [(5, 3), (4, 3, 7), (3, 4, 5, 6), (2, 3, 3, 4, 5)]


def _params(c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(c, generator=g),
        torch.rand(c, generator=g) * 2 + 0.2,
        torch.randn(c, generator=g),
        torch.randn(c, generator=g),
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,beta", [(0.25, 0.25), (0.1, 0.6), (1.0, 1.0), (0.0, 0.3)])
def test_corrected_bn_matches_reference(shape, alpha, beta):
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    mu_e, var_e, gamma, b = (t.double() for t in _params(shape[1]))
    y = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-5, alpha, beta)
    ref = corrected_bn_reference(
        x.numpy(), mu_e.numpy(), var_e.numpy(), gamma.numpy(), b.numpy(), 1e-5, alpha, beta
    )
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_per_channel_coefficients(shape):
    c = shape[1]
    x = torch.randn(*shape, dtype=torch.float64)
    mu_e, var_e, gamma, b = (t.double() for t in _params(c, 1))
    alpha = torch.linspace(0, 1, c, dtype=torch.float64)
    beta = torch.linspace(1, 0, c, dtype=torch.float64)
    y = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-3, alpha, beta)
    ref = corrected_bn_reference(
        x.numpy(), mu_e.numpy(), var_e.numpy(), gamma.numpy(), b.numpy(), 1e-3, alpha.numpy(), beta.numpy()
    )
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_is_plain_eval_bn(shape):
    x = torch.randn(*shape)
    mu_e, var_e, gamma, b = _params(shape[1], 2)
    y = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-5, 0.0, 0.0)
    ref = torch.nn.functional.batch_norm(x, mu_e, var_e, gamma, b, training=False, eps=1e-5)
    assert (y - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_one_is_per_example_statistics(shape):
    """alpha = beta = 1 normalizes each example with its own spatial statistics (instance norm)."""
    x = torch.randn(*shape, dtype=torch.float64)
    mu_e, var_e, gamma, b = (t.double() for t in _params(shape[1], 3))
    y = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-5, 1.0, 1.0)
    ref = torch.nn.functional.instance_norm(x, weight=gamma, bias=b, eps=1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.25, 0.7, 1.0])
def test_alpha_equals_beta_is_example_weighing_ex2(shape, alpha):
    """Four Things' E[x^2] parameterization expands to the same layer when beta = alpha."""
    x = torch.randn(*shape, dtype=torch.float64) + 1.0
    mu_e, var_e, gamma, b = (t.double() for t in _params(shape[1], 4))
    y = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-5, alpha, alpha)
    ref = example_weighing_ex2_reference(
        x.numpy(), mu_e.numpy(), var_e.numpy(), gamma.numpy(), b.numpy(), 1e-5, alpha
    )
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-8, atol=1e-8)


def test_input_map_reproduces_direct_formula():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    mu_e, var_e, gamma, b = (t.double() for t in _params(3, 5))
    mu_i, var_i = C.example_stats(x)
    mu_hat, var_hat = C.corrected_stats(mu_i, var_i, mu_e, var_e, 0.3, 0.2)
    k, m = C.input_map(mu_hat, var_hat, mu_e, var_e, 1e-5)
    x_mapped = x * C.expand_to(k, x) + C.expand_to(m, x)
    via_bn = torch.nn.functional.batch_norm(x_mapped, mu_e, var_e, gamma, b, training=False, eps=1e-5)
    direct = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-5, 0.3, 0.2)
    torch.testing.assert_close(via_bn, direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("values", [1, 2, 5, 8, 9, 40])
@pytest.mark.parametrize("mv_max", [0, C.MV_STATS_MAX_VALUES])
def test_example_stats_both_reductions_match_float64(values, mv_max, monkeypatch):
    """Short rows take the matrix-vector route on CPU, longer ones the reductions; with either threshold the
    float32 statistics match a float64 computation, also for a mean 1000x the spread (two passes)."""
    monkeypatch.setattr(C, "MV_STATS_MAX_VALUES", mv_max)
    g = torch.Generator().manual_seed(values)
    x32 = (torch.randn(6, 5, values, dtype=torch.float64, generator=g) + 1000.0).float()
    x64 = x32.double()  # the same values, statistics in float64
    mu, var = C.example_stats(x32)
    assert mu.shape == var.shape == (6, 5) and mu.dtype == torch.float32
    torch.testing.assert_close(mu.double(), x64.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var(-1, unbiased=False), rtol=1e-4, atol=1e-9)
    mu4, var4 = C.example_stats(x32.reshape(6, 5, 1, values))  # same rows, rank 4
    torch.testing.assert_close((mu4, var4), (mu, var))


def test_batch_stats_match_training_mode_bn():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mu, var = C.batch_stats(x)
    y = C.normalize(x, mu, var, 1e-5)
    ref = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_l_aux_matches_reference(shape):
    x = torch.randn(*shape, dtype=torch.float64) * 1.5 + 0.3
    mu_e, var_e, _, _ = (t.double() for t in _params(shape[1], 6))
    for a, b in [(0.0, 0.0), (0.2, 0.4), (1.0, 0.5)]:
        got = float(C.l_aux(x, mu_e, var_e, 1e-5, a, b))
        assert got == pytest.approx(
            l_aux_reference(x.numpy(), mu_e.numpy(), var_e.numpy(), 1e-5, a, b), rel=1e-9
        )


def test_fp16_input_computes_in_float32():
    x = (torch.randn(3, 4, 8, 8) * 3 + 2).half()
    mu_e, var_e, gamma, b = _params(4, 7)
    y = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-5, 0.25, 0.25)
    assert y.dtype == torch.float16
    ref = C.corrected_batch_norm(x.float(), mu_e, var_e, gamma, b, 1e-5, 0.25, 0.25)
    assert (y.float() - ref).abs().max() < 1e-2


def test_rule_of_thumb():
    assert C.rule_of_thumb(2) == 0.25
    assert C.rule_of_thumb(8) == 1 / 64
    with pytest.raises(ValueError):
        C.rule_of_thumb(0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    alpha=st.floats(0, 1),
    beta=st.floats(0, 1),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(n, c, spatial, alpha, beta, eps, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 3
    mu_e = torch.randn(c, generator=g, dtype=torch.float64)
    var_e = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    gamma = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    y = C.corrected_batch_norm(x, mu_e, var_e, gamma, b, eps, alpha, beta)
    ref = corrected_bn_reference(
        x.numpy(), mu_e.numpy(), var_e.numpy(), gamma.numpy(), b.numpy(), eps, alpha, beta
    )
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-8, atol=1e-8)
    # the corrected variance is a convex combination of non-negative terms: never negative
    mu_i, var_i = C.example_stats(x)
    _, var_hat = C.corrected_stats(mu_i, var_i, mu_e, var_e, alpha, beta)
    assert (var_hat >= -1e-12).all()


@pytest.mark.parametrize(
    ("shape", "per_example"),
    [
        ((4, 3, 20), True),
        ((4, 3, 5, 5), True),
        ((4, 3, 2), True),
        ((5, 3, 4, 4, 2), True),
        ((4, 3, 6, 6), False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("min_numel", [0, 1 << 40])
def test_affine_equals_x_times_s_plus_t(shape, per_example, dtype, min_numel, monkeypatch):
    """Both paths (BatchNorm kernel over an (1, N*C, L) view, and addcmul) give x * s + t, with gradients."""
    monkeypatch.setattr(C, "BN_VIEW_MIN_NUMEL", min_numel)  # 0: the view path wherever rows are long enough
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    rows = (shape[0], shape[1]) if per_example else (shape[1],)
    s = (torch.rand(*rows, generator=g, dtype=dtype) + 0.5).requires_grad_()
    t = torch.randn(*rows, generator=g, dtype=dtype).requires_grad_()
    view = (*rows, *([1] * (len(shape) - 2))) if per_example else (1, shape[1], *([1] * (len(shape) - 2)))
    expected = x * s.detach().reshape(view) + t.detach().reshape(view)
    y = C.affine(x, s, t)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    dims = tuple(range(2, len(shape))) if per_example else (0, *range(2, len(shape)))
    torch.testing.assert_close(s.grad, (2 * expected * x).sum(dims), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.grad, (2 * expected).sum(dims), rtol=1e-5, atol=1e-5)
    # a non-contiguous input takes the addcmul path and agrees
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(C.affine(xt, s.detach(), t.detach()), expected)


@pytest.mark.parametrize(
    "coef_shape,stat_shape,as_float",
    [
        ((), (6, 4), False),
        ((), (6, 4), True),
        ((4,), (6, 4), False),
        ((3, 1, 4), (3, 5, 4), False),
        ((3, 1, 4), (1, 5, 4), False),
    ],
    ids=["scalar", "float", "per-channel", "candidates", "candidates-shared-rows"],
)
@pytest.mark.parametrize("affine_params", [True, False])
def test_corrected_scale_shift_equals_the_two_step_form(coef_shape, stat_shape, affine_params, as_float):
    """The op-saving form gives scale_shift(corrected_stats(...)) for every broadcast the callers use."""
    g = torch.Generator().manual_seed(len(coef_shape) * 10 + len(stat_shape))
    c = stat_shape[-1]
    mu_i = torch.randn(stat_shape, dtype=torch.float64, generator=g) * 2
    var_i = torch.rand(stat_shape, dtype=torch.float64, generator=g) * 3
    stats_shape = coef_shape if len(coef_shape) == 3 else (c,)
    mu_e = torch.randn(stats_shape, dtype=torch.float64, generator=g)
    var_e = torch.rand(stats_shape, dtype=torch.float64, generator=g) + 0.2
    alpha = torch.rand(coef_shape, dtype=torch.float64, generator=g)
    beta = torch.rand(coef_shape, dtype=torch.float64, generator=g)
    if as_float:
        alpha, beta = float(alpha), float(beta)
    weight = torch.randn(c, dtype=torch.float64, generator=g) if affine_params else None
    bias = torch.randn(c, dtype=torch.float64, generator=g) if affine_params else None
    inputs = [v.clone() for v in (mu_i, var_i, mu_e, var_e) if isinstance(v, torch.Tensor)]
    s, t = C.corrected_scale_shift(mu_i, var_i, mu_e, var_e, alpha, beta, 1e-3, weight, bias)
    for before, after in zip(inputs, (mu_i, var_i, mu_e, var_e), strict=True):
        assert torch.equal(before, after), "an input was modified in place"
    ref_s, ref_t = C.scale_shift(
        *C.corrected_stats(mu_i, var_i, mu_e, var_e, alpha, beta), 1e-3, weight, bias
    )
    torch.testing.assert_close(s, ref_s.expand_as(s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, ref_t.expand_as(t), rtol=1e-12, atol=1e-12)
    assert s.shape == torch.broadcast_shapes(mu_i.shape, mu_e.shape, torch.as_tensor(alpha).shape)


def test_scalar_coefficients_with_gradient_stay_differentiable():
    """0-d coefficients are read as floats on CPU only when no gradient is asked of them."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=g)
    mu_e, var_e, gamma, b = (t.double() for t in _params(3, 7))
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, bb: C.corrected_batch_norm(x, mu_e, var_e, gamma, b, 1e-5, a, bb), (alpha, beta)
    )
    # and through the input and the affine parameters (a corrected model in eval mode, backward called)
    xg, gg, bg = x.clone().requires_grad_(), gamma.clone().requires_grad_(), b.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda xx, w, bias: C.corrected_batch_norm(xx, mu_e, var_e, w, bias, 1e-5, 0.3, 0.2), (xg, gg, bg)
    )
    assert torch.autograd.gradcheck(
        lambda xx, w: C.corrected_batch_norm(xx, mu_e, var_e, w, None, 1e-5, 0.3, 0.2), (xg, gg)
    )
    mu_b, var_b = C.batch_stats(x)
    mu_i, var_i = C.example_stats(x)
    assert torch.autograd.gradcheck(
        lambda a, bb: C.l_aux_given_stats(x, mu_b, var_b, mu_i, var_i, mu_e, var_e, 1e-5, a, bb),
        (alpha, beta),
    )


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (1, 7, 33), (2, 3, 2, 2, 5)])
def test_example_stats_in_pieces_match_whole(shape, monkeypatch):
    """Large activations take their variance a piece of rows at a time: same values, same gradients."""
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, dtype=torch.float64, generator=g) * 3 + 50).requires_grad_()
    whole = C.example_stats(x)
    monkeypatch.setattr(C, "STATS_CHUNK_MIN_BYTES", 0)
    monkeypatch.setattr(C, "STATS_CHUNK_BYTES", 5 * 8)  # pieces of 5 values: rows split unevenly
    pieces = C.example_stats(x)
    torch.testing.assert_close(pieces, whole, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(pieces[1], x.detach().var(dim=tuple(range(2, x.dim())), unbiased=False))
    (gw,) = torch.autograd.grad(whole[1].sum() + whole[0].sum(), x)
    (gp,) = torch.autograd.grad(pieces[1].sum() + pieces[0].sum(), x)
    torch.testing.assert_close(gp, gw)
    cl = x.detach().float().contiguous(memory_format=torch.channels_last) if x.dim() == 4 else None
    if cl is not None:  # not contiguous: taken whole
        torch.testing.assert_close(C.example_stats(cl)[1], whole[1].detach().float(), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ analytic gradients (the per-layer fit)
def _moments_formula(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over the spatial axes, written out (autograd differentiates this)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    mean = flat.sum(-1) / flat.shape[-1]
    return mean, ((flat - mean[..., None]) ** 2).sum(-1) / flat.shape[-1]


@pytest.mark.parametrize("shape", [(3, 4, 5), (3, 4, 6, 5), (2, 3, 2, 2), (5, 2, 1)])
def test_example_stats_grad_values_and_gradient(shape):
    """Same values as example_stats; its analytic gradient equals autograd's of the written-out formula and
    finite differences (float64; (2, 2) and 1-value rows take the matrix-vector reduction, a constant row a
    zero variance)."""
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    with torch.no_grad():
        x[0, 0] = 0.7  # a constant (example, channel): variance 0
    mean, var = C.example_stats_grad(x)
    ref_mean, ref_var = C.example_stats(x.detach())
    assert torch.equal(mean.detach(), ref_mean) and torch.equal(var.detach(), ref_var)
    g_mean, g_var = (
        torch.randn(mean.shape, generator=g, dtype=torch.float64),
        torch.randn(var.shape, generator=g, dtype=torch.float64),
    )
    got = torch.autograd.grad((mean * g_mean).sum() + (var * g_var).sum(), x)[0]
    fm, fv = _moments_formula(x)
    want = torch.autograd.grad((fm * g_mean).sum() + (fv * g_var).sum(), x)[0]
    assert float((got - want).abs().max()) <= 1e-12
    assert torch.autograd.gradcheck(lambda t: C.example_stats_grad(t), (x,))
    # without autograd recording it is example_stats itself
    with torch.no_grad():
        assert not C.example_stats_grad(x)[0].requires_grad


@pytest.mark.parametrize("coef_shape", [(3, 1, 1), (3, 1, 4)])
@pytest.mark.parametrize("stat_rows", [1, 3])
@pytest.mark.parametrize("affine_params", [True, False])
def test_corrected_scale_shift_backward_matches_autograd(coef_shape, stat_rows, affine_params):
    """The written-out gradients of (s, t) with respect to mu_i, var_i, alpha, beta against autograd through
    corrected_scale_shift, summed to each operand's shape (coefficients (K, 1, P) against statistics of 1
    or K row blocks, as in the stacked fit)."""
    g = torch.Generator().manual_seed(sum(coef_shape) + stat_rows)
    f64 = dict(generator=g, dtype=torch.float64)
    mu = torch.randn(stat_rows, 5, 4, **f64).requires_grad_(True)
    var = (torch.rand(stat_rows, 5, 4, **f64) * 2).requires_grad_(True)
    alpha = torch.rand(*coef_shape, **f64).requires_grad_(True)
    beta = torch.rand(*coef_shape, **f64).requires_grad_(True)
    mu_e, var_e = torch.randn(4, **f64), torch.rand(4, **f64) + 0.5
    weight, bias = (torch.randn(4, **f64), torch.randn(4, **f64)) if affine_params else (None, None)
    s, t = C.corrected_scale_shift(mu, var, mu_e, var_e, alpha, beta, 1e-3, weight, bias)
    g_s, g_t = torch.randn(s.shape, **f64), torch.randn(t.shape, **f64)
    want = torch.autograd.grad((s * g_s).sum() + (t * g_t).sum(), (mu, var, alpha, beta))
    got = C.corrected_scale_shift_backward(
        g_s, g_t, mu.detach(), var.detach(), mu_e, var_e, alpha.detach(), beta.detach(), 1e-3, weight
    )
    for w, gt, operand in zip(want, got, (mu, var, alpha, beta), strict=True):
        assert float((gt.sum_to_size(operand.shape) - w).abs().max()) <= 1e-10

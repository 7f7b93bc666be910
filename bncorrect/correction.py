r"""The corrected BatchNorm normalization, as pure tensor functions (DESIGN §2-3).

Everything else in bncorrect (the PyTorch layer, the estimator, the sweep, the ONNX builder's tests) calls
these functions; the formulas live here only.

For a BN layer with input ``x`` of shape (N, C, *spatial), affine ``gamma``, ``b``, running statistics
``mu_E``, ``var_E`` and ``eps``, for example ``i`` and channel ``c``::

    mu_i    = mean of x_i over the spatial axes             ((N, C) input: mu_i = x_i)
    var_i   = biased variance of x_i over the spatial axes  ((N, C) input: var_i = 0)
    d       = mu_i - mu_E
    mu_hat  = mu_E + alpha * d
    var_hat = beta * var_i + (1 - beta) * var_E + beta * (1 - beta) * d^2
    y       = gamma * (x - mu_hat) / sqrt(var_hat + eps) + b
            = x * s + t,   s = gamma / sqrt(var_hat + eps),   t = b - mu_hat * s

alpha = beta = 0 is plain inference BN; alpha = beta is inference example weighing (Four Things, 3.1);
alpha = beta = 1/B^2 is EvalNorm's rule of thumb. alpha and beta are scalars or per-channel vectors (C,).

The same output can be produced by feeding plain eval-mode BN a remapped input (used for BN-like modules
whose forward does more than normalize)::

    x' = (x - mu_hat) * k + mu_E,   k = sqrt(var_E + eps) / sqrt(var_hat + eps)
    BN_eval(x') = gamma * (x - mu_hat) / sqrt(var_hat + eps) + b            (gamma cancels out of k)

Offline estimation (EvalNorm eqs. 7-9): with ``mu_B``, ``var_B`` the statistics of the normalization batch
(B examples, over the batch and spatial axes, biased)::

    target   = (x - mu_B) / sqrt(var_B + eps)
    estimate = (x - mu_hat) / sqrt(var_hat + eps)
    L_aux    = mean |target - estimate|

Both normalizations are affine in ``x`` within one (example, channel), so target - estimate = a * x + b
with per-(example, channel) a = 1/sigma_B - 1/sigma_hat and b = mu_hat/sigma_hat - mu_B/sigma_B, and

    sum_v |a x_v + b| = |a| * sum_v |x_v - z|,   z = -b / a,

which sorted values and their prefix sums give in O(log S) per (example, channel) for any (alpha, beta)
(:func:`l_aux_sorted`); the estimator minimises L_aux over a grid that way without re-reading activations.
The statistics of a normalization group follow from the per-example ones (law of total variance)::

    mu_B  = mean_i mu_i,   var_B = mean_i var_i + mean_i (mu_i - mu_B)^2
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Coefficient = float | Tensor

__all__ = [
    "affine",
    "batch_stats",
    "corrected_batch_norm",
    "corrected_scale_shift",
    "corrected_scale_shift_backward",
    "corrected_stats",
    "example_stats",
    "example_stats_grad",
    "expand_to",
    "group_stats",
    "input_map",
    "l_aux",
    "l_aux_given_stats",
    "l_aux_sorted",
    "normalize",
    "rule_of_thumb",
    "scale_shift",
    "stats_dtype",
]


def rule_of_thumb(train_batch_size: int) -> float:
    """EvalNorm's rule of thumb: alpha = beta = 1 / B^2."""
    if train_batch_size < 1:
        raise ValueError("train_batch_size must be >= 1")
    return 1.0 / float(train_batch_size) ** 2


def stats_dtype(x: Tensor) -> torch.dtype:
    """Statistics are computed in at least float32 (fp16/bf16 activations are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_to(v: Tensor, x: Tensor) -> Tensor:
    """View a per-(N, C) or per-channel (C,) tensor so that it broadcasts against ``x`` (N, C, *spatial)."""
    extra = (1,) * (x.dim() - 2)
    if v.dim() == 0:
        return v
    if v.dim() == 1:
        return v.reshape(1, -1, *extra)
    return v.reshape(v.shape[0], v.shape[1], *extra)


#: per-example moments over at most this many values per (example, channel) run as matrix-vector products
#: on CPU (measured faster for L <= 8 with 1 and 2 threads; slower from about 32 on with 2 threads)
MV_STATS_MAX_VALUES = 8
#: on CPU the variance of activations of at least STATS_CHUNK_MIN_BYTES is taken STATS_CHUNK_BYTES of rows
#: at a time (measured 3.4x faster at 103 MB, 1.4x at 26 MB; slower below about 8 MB)
STATS_CHUNK_MIN_BYTES = 16 << 20
STATS_CHUNK_BYTES = 4 << 20


def example_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example, per-channel mean and biased variance over the spatial axes: two (N, C) tensors."""
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *spatial), got {tuple(x.shape)}")
    dt = stats_dtype(x)
    if x.dim() == 2:
        xf = x.to(dt)
        return xf, torch.zeros_like(xf)
    # Two passes (mean, then the mean square of the deviations): as stable as Welford, and on CPU several
    # times faster than var_mean over trailing axes (measured: benchmarks/README.md).
    xf = x.to(dt)
    values = math.prod(xf.shape[2:]) if xf.shape[0] and xf.shape[1] else 0
    if 0 < values <= MV_STATS_MAX_VALUES and xf.device.type == "cpu":
        # a handful of values per row: reductions over a short trailing axis are slow on CPU; the same two
        # passes as matrix-vector products against a 1/L vector run 1.5-3x faster there
        rows = xf.reshape(-1, values)
        w = torch.full((values,), 1.0 / values, dtype=dt)
        mean_rows = torch.mv(rows, w)
        var_rows = torch.mv((rows - mean_rows[:, None]).square_(), w)
        return mean_rows.view(x.shape[:2]), var_rows.view(x.shape[:2])
    dims = tuple(range(2, x.dim()))
    mean = xf.mean(dims, keepdim=True)
    nbytes = xf.numel() * xf.element_size()
    if xf.device.type == "cpu" and nbytes >= STATS_CHUNK_MIN_BYTES and xf.is_contiguous():
        # the deviations of a large activation, a piece of rows at a time: one temporary of the whole
        # activation is a fresh allocation whose page faults cost more than the arithmetic
        rows, mean_rows = xf.view(-1, values), mean.view(-1, 1)
        step = max(1, STATS_CHUNK_BYTES // (values * xf.element_size()))
        pieces = [
            (rows[a : a + step] - mean_rows[a : a + step]).square_().mean(1)
            for a in range(0, rows.shape[0], step)
        ]
        var = torch.cat(pieces).view(x.shape[:2])
    else:
        var = (xf - mean).square_().mean(dims)
    return mean.reshape(var.shape), var


class _ExampleStats(torch.autograd.Function):
    """:func:`example_stats` with its gradient written out (see :func:`example_stats_grad`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        mean, var = example_stats(x)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_mean: Tensor, g_var: Tensor) -> Tensor:  # type: ignore[override]
        x, mean = ctx.saved_tensors  # type: ignore[attr-defined]
        values = math.prod(x.shape[2:])
        # d mean / d x_v = 1/L; d var / d x_v = 2 (x_v - mean) / L (the mean's own term sums to 0), so
        # grad_x = x * k + (g_mean / L - k * mean) with k = 2 g_var / L, per (example, channel)
        k = g_var * (2.0 / values)
        return affine(x, k, g_mean / values - k * mean)


def example_stats_grad(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`example_stats` (the same values, computed by it), with an analytic backward when autograd
    records: the gradient of the mean and the biased variance with respect to ``x`` is

        grad_x = g_mean / L + g_var * 2 (x - mean) / L          (L values per (example, channel))

    one fused pass over ``x`` (:func:`affine`) instead of the five to seven that autograd's mean, subtract,
    square and mean take. For (N, C) input (mean = x, var = 0) and without autograd it is
    :func:`example_stats` itself."""
    if x.dim() > 2 and torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        mean, var = _ExampleStats.apply(x)
        return mean, var
    return example_stats(x)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Training-mode BN statistics: per-channel mean and biased variance over batch and spatial axes."""
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *spatial), got {tuple(x.shape)}")
    xf = x.to(stats_dtype(x))
    dims = (0, *range(2, x.dim()))
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    return mean, var


def group_stats(mu_i: Tensor, var_i: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Training-mode statistics of consecutive groups of ``group_size`` examples (None: the whole batch),
    from per-example statistics (N, C); returned per example, (N, C), each row its group's statistics.
    The last group may be shorter."""
    n = mu_i.shape[0]
    g = n if group_size is None or group_size >= n else group_size
    if n % g == 0:
        mu = mu_i.reshape(n // g, g, -1)
        var = var_i.reshape(n // g, g, -1)
        mu_b = mu.mean(dim=1, keepdim=True)
        var_b = var.mean(dim=1, keepdim=True) + (mu - mu_b).square().mean(dim=1, keepdim=True)
        return mu_b.expand_as(mu).reshape(n, -1), var_b.expand_as(var).reshape(n, -1)
    head = (n // g) * g
    m1, v1 = group_stats(mu_i[:head], var_i[:head], g)
    m2, v2 = group_stats(mu_i[head:], var_i[head:], None)
    return torch.cat([m1, m2]), torch.cat([v1, v2])


def corrected_stats(
    mu_i: Tensor, var_i: Tensor, mu_e: Tensor, var_e: Tensor, alpha: Coefficient, beta: Coefficient
) -> tuple[Tensor, Tensor]:
    """Blend each example's own statistics into the running ones: (mu_hat, var_hat), shape (N, C)."""
    d = mu_i - mu_e
    mu_hat = mu_e + alpha * d
    var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * d * d
    return mu_hat, var_hat


def scale_shift(
    mean: Tensor, var: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-(N, C) (or per-channel) affine form of the normalization: y = x * s + t."""
    s = torch.rsqrt(var + eps)
    if weight is not None:
        s = s * weight.to(s.dtype)
    t = -mean * s
    if bias is not None:
        t = t + bias.to(s.dtype)
    return s, t


def corrected_scale_shift(
    mu_i: Tensor,
    var_i: Tensor,
    mu_e: Tensor,
    var_e: Tensor,
    alpha: Coefficient,
    beta: Coefficient,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``scale_shift(*corrected_stats(mu_i, var_i, mu_e, var_e, alpha, beta), eps, weight, bias)`` in about
    half the tensor ops on (N, C) (the per-channel terms are formed once, on (C,)-sized tensors)::

        d = mu_i - mu_E
        s = gamma * rsqrt(beta * var_i + [(1 - beta) * var_E + eps] + [beta * (1 - beta)] * d^2)
        t = b - (mu_E + alpha * d) * s

    Coefficients and running statistics broadcast against ``mu_i``/``var_i`` (scalars, (C,), or e.g.
    (K, 1, C) for K candidates against (K, m, C) or (1, m, C) statistics). The op count matters where the
    (N, C) math rivals the activation pass: batch-1 inference and activations of a few values per row.
    """
    # in-place steps on fresh intermediates, unless autograd needs them
    operands = (mu_i, var_i, mu_e, var_e, alpha, beta, weight, bias)
    inplace = not torch.is_grad_enabled() or not any(
        isinstance(v, Tensor) and v.requires_grad for v in operands
    )
    d = mu_i - mu_e
    c0 = (1 - beta) * var_e + eps  # per channel
    c1 = beta * (1 - beta)
    v = torch.addcmul(c0, var_i, beta) if isinstance(beta, Tensor) else var_i * beta + c0
    dd = d * c1 if isinstance(c1, Tensor) else d
    value = 1.0 if isinstance(c1, Tensor) else float(c1)
    v = v.addcmul_(dd, d, value=value) if inplace else v.addcmul(dd, d, value=value)
    s = v.rsqrt_() if inplace else v.rsqrt()
    if weight is not None:
        s = s.mul_(weight.to(s.dtype)) if inplace else s * weight.to(s.dtype)
    if isinstance(alpha, Tensor):
        mu_hat = torch.addcmul(mu_e, d, alpha)
    else:
        mu_hat = d.mul_(float(alpha)).add_(mu_e) if inplace else d * float(alpha) + mu_e
    if bias is None:
        return s, (mu_hat.mul_(s).neg_() if inplace else -(mu_hat * s))
    return s, torch.addcmul(bias.to(s.dtype), mu_hat, s, value=-1.0)


def corrected_scale_shift_backward(
    g_s: Tensor,
    g_t: Tensor,
    mu_i: Tensor,
    var_i: Tensor,
    mu_e: Tensor,
    var_e: Tensor,
    alpha: Tensor,
    beta: Tensor,
    eps: float,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`corrected_scale_shift`'s ``(s, t)`` with respect to ``mu_i``, ``var_i``,
    ``alpha`` and ``beta``, given ``g_s``, ``g_t`` (the gradients of the loss with respect to s and t),
    each in the broadcast shape of s (the caller sums them to its operands' shapes). With
    ``v = beta var_i + (1 - beta) var_E + eps + beta (1 - beta) d^2``, ``s = gamma v^-1/2`` and
    ``t = b - mu_hat s``::

        g_mu_hat = -g_t s                    g_v     = -(g_s - g_t mu_hat) s / (2 v)
        g_alpha  = g_mu_hat d                g_beta  = g_v (var_i - var_E + (1 - 2 beta) d^2)
        g_var_i  = g_v beta                  g_mu_i  = g_mu_hat alpha + 2 g_v beta (1 - beta) d

    (the bias and gamma are constants here: their gradients are not formed)."""
    d = mu_i - mu_e
    c1 = beta * (1 - beta)
    v = torch.addcmul((1 - beta) * var_e + eps, var_i, beta).addcmul_(d * c1, d)
    s = v.rsqrt()
    if weight is not None:
        s = s * weight.to(s.dtype)
    mu_hat = torch.addcmul(mu_e, d, alpha)
    g_mu_hat = -g_t * s
    g_v = (g_s - g_t * mu_hat).mul_(s).div_(v).mul_(-0.5)
    g_alpha = g_mu_hat * d
    g_beta = g_v * torch.addcmul(var_i - var_e, d * d, 1 - 2 * beta)
    g_var = g_v * beta
    g_mu = torch.addcmul(g_mu_hat * alpha, g_v, d * (2 * c1))
    return g_mu, g_var, g_alpha, g_beta


#: x * s + t with a per-(N, C) scale runs as BatchNorm's inference kernel over a (1, N*C, L) view when
#: each (example, channel) has at least BN_VIEW_MIN_VALUES values and the whole tensor at least
#: BN_VIEW_MIN_NUMEL (up to 2x faster than a broadcast addcmul on CPU there; slower for a handful of values
#: per row or for small tensors, where the call overhead dominates: benchmarks/README.md), else as one
#: addcmul.
BN_VIEW_MIN_VALUES = 16
BN_VIEW_MIN_NUMEL = 1 << 17


def affine(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """y = x * s + t with ``s``, ``t`` of shape (C,) or (N, C), broadcast over the spatial axes.

    Computed in the dtype of ``s`` and ``t`` (fp16/bf16 ``x`` is upcast to the statistics' float32) and
    returned in ``x``'s dtype. A per-(N, C) scale is applied as eval-mode batch norm of the (1, N*C, L)
    view with running mean 0, running variance 1 and eps 0: (x - 0) / sqrt(1 + 0) * s + t, exactly
    x * s + t, in one fused pass.
    """
    if x.dtype != s.dtype:
        return affine(x.to(s.dtype), s, t).to(x.dtype)
    nc = s.numel()
    if (
        s.dim() == 2
        and x.dim() > 2
        and x.shape[0] == s.shape[0]
        and x.is_contiguous()
        and x.numel() >= max(BN_VIEW_MIN_VALUES * nc, BN_VIEW_MIN_NUMEL)
        and nc > 0
    ):
        zeros = torch.zeros(nc, dtype=s.dtype, device=s.device)
        ones = torch.ones(nc, dtype=s.dtype, device=s.device)
        view = x.view(1, nc, -1)
        out = torch.nn.functional.batch_norm(view, zeros, ones, s.reshape(nc), t.reshape(nc), False, 0.0, 0.0)
        return out.view(x.shape)
    return torch.addcmul(expand_to(t, x), x, expand_to(s, x))


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """gamma * (x - mean) / sqrt(var + eps) + b with ``mean``/``var`` of shape (C,) or (N, C)."""
    s, t = scale_shift(mean, var, eps, weight, bias)
    return affine(x, s, t)


def corrected_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    alpha: Coefficient,
    beta: Coefficient,
) -> Tensor:
    """The corrected layer of DESIGN §2 in eval mode."""
    mu_i, var_i = example_stats(x)
    dt = mu_i.dtype
    s, t = corrected_scale_shift(
        mu_i, var_i, running_mean.to(dt), running_var.to(dt), _as(alpha, dt), _as(beta, dt), eps, weight, bias
    )
    return affine(x, s, t)


def input_map(
    mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(k, m) such that eval-mode BN of ``x * k + m`` normalizes ``x`` with ``mean``/``var`` instead.

    k = sqrt(var_E + eps) / sqrt(var + eps), m = mu_E - mean * k. Independent of the affine parameters,
    so it serves any BN-like module whose eval forward uses its running statistics.
    """
    dt = mean.dtype
    k = torch.sqrt(running_var.to(dt) + eps) * torch.rsqrt(var + eps)
    m = running_mean.to(dt) - mean * k
    return k, m


def l_aux_given_stats(
    x: Tensor,
    mu_b: Tensor,
    var_b: Tensor,
    mu_i: Tensor,
    var_i: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    alpha: Coefficient,
    beta: Coefficient,
) -> Tensor:
    """Mean |target - estimate| over ``x`` (N, C, *rest) with the statistics given explicitly.

    ``mu_b``/``var_b`` may be (C,) or (N, C) (each row's own normalization batch); ``mu_i``/``var_i`` are
    (N, C). This form lets the estimator evaluate L_aux on a sample of positions per example.
    """
    dt = stats_dtype(x)
    xf = x.to(dt)
    target = (xf - expand_to(mu_b, x)) * expand_to(torch.rsqrt(var_b + eps), x)
    mu_hat, var_hat = corrected_stats(
        mu_i, var_i, running_mean.to(dt), running_var.to(dt), _as(alpha, dt), _as(beta, dt)
    )
    estimate = (xf - expand_to(mu_hat, x)) * expand_to(torch.rsqrt(var_hat + eps), x)
    return (target - estimate).abs().mean()


def l_aux(
    x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float, alpha: Coefficient, beta: Coefficient
) -> Tensor:
    """EvalNorm's auxiliary loss (eq. 9) for one normalization batch ``x`` of B examples."""
    mu_b, var_b = batch_stats(x)
    mu_i, var_i = example_stats(x)
    return l_aux_given_stats(x, mu_b, var_b, mu_i, var_i, running_mean, running_var, eps, alpha, beta)


def l_aux_sorted(
    sorted_x: Tensor,
    prefix: Tensor,
    mu_b: Tensor,
    var_b: Tensor,
    mu_i: Tensor,
    var_i: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    alpha: Tensor,
    beta: Tensor,
) -> Tensor:
    """L_aux for K candidate (alpha, beta) pairs at once, from sorted samples: shape (K,).

    ``sorted_x`` (R, C, S): S values of each (example, channel) row, sorted ascending; ``prefix`` (R, C, S+1)
    their cumulative sums starting at 0; ``mu_b``, ``var_b``, ``mu_i``, ``var_i`` (R, C); running
    statistics broadcasting against (R, C); alpha, beta (K,). Equals :func:`l_aux_given_stats` on the same
    values, without touching them once per candidate. Within a row both normalizations are affine in x::

        target - estimate = slope * x + offset,  slope = 1/sigma_B - 1/sigma_hat,
                                                 offset = mu_hat/sigma_hat - mu_B/sigma_B
        sum_v |slope x_v + offset| = |slope| sum_v |x_v - z|,   z = -offset / slope
        sum_v |x_v - z| = z i - P_i + (P_S - P_i) - z (S - i),  i = #{v: x_v < z}, P = prefix sums

    (``|offset| S`` where slope = 0). Computed with the rows as the leading axis and the candidates as the
    trailing one, in blocks of rows of at most :data:`L_AUX_BLOCK` (row, candidate) pairs: every temporary
    is a contiguous (rows, K) block that the searchsorted queries and the prefix-sum gathers read in place
    (no transposed copies); the mean is then taken over the rows of each candidate in the same order as a
    (K, R * C) sum, so the block size does not change the result.
    """
    r, c, s = sorted_x.shape
    n = r * c
    dt = sorted_x.dtype
    k = int(alpha.numel())

    def rows(t: Tensor) -> Tensor:  # (R, C)-broadcastable statistics as a column of the n rows
        return t.to(dt).expand(r, c).reshape(n, 1)

    a_k = alpha.to(dt).reshape(1, k)
    b_k = beta.to(dt).reshape(1, k)
    sorted_rows, prefix_rows = sorted_x.reshape(n, s), prefix.reshape(n, s + 1)
    mu_i, var_i, mu_e, var_e = rows(mu_i), rows(var_i), rows(running_mean), rows(running_var)
    inv_b = torch.rsqrt(rows(var_b) + eps)
    shift_b = rows(mu_b) * inv_b
    # corrected_stats per row, rearranged for few (rows, K) operations:
    #   mu_hat = mu_e + alpha d,   var_hat + eps = (var_e + eps) + beta p - beta^2 d^2,
    #   d = mu_i - mu_e,  p = var_i - var_e + d^2   (= beta var_i + (1-beta) var_e + beta(1-beta) d^2 + eps)
    d = mu_i - mu_e
    dd = d * d
    p = var_i - var_e + dd
    ve = var_e + eps
    neg_b2 = -(b_k * b_k)
    per_row = torch.empty(n, k, dtype=dt, device=sorted_x.device)
    step = max(1, L_AUX_BLOCK // max(1, k))
    for a in range(0, n, step):  # blocks of rows: temporaries of at most L_AUX_BLOCK values
        e = min(n, a + step)
        inv_hat = torch.addcmul(ve[a:e], p[a:e], b_k).addcmul_(dd[a:e], neg_b2).rsqrt_()
        offset = torch.addcmul(mu_e[a:e], d[a:e], a_k).mul_(inv_hat).sub_(shift_b[a:e])
        slope = torch.sub(inv_b[a:e], inv_hat)  # (rows, K)
        flat = slope == 0
        z = torch.div(offset, slope).neg_().masked_fill_(flat, 0.0)  # slope = 0: any z (its term is below)
        idx = torch.searchsorted(sorted_rows[a:e], z)  # values below each query
        below = torch.gather(prefix_rows[a:e], 1, idx)
        # sum_v |x_v - z| = z i - P_i + (P_S - P_i) - z (S - i) = z (2 i - S) + P_S - 2 P_i; the count is
        # exact in dt (S < 2^24)
        dist = z.mul_(idx.to(dt).mul_(2).sub_(s)).add_(prefix_rows[a:e, -1:]).sub_(below, alpha=2)
        torch.where(flat, offset.abs_().mul_(s), slope.abs_().mul_(dist), out=per_row[a:e])
    return per_row.T.contiguous().sum(dim=1) / (n * s)


#: :func:`l_aux_sorted` evaluates blocks of at most this many (row, candidate) pairs at a time, so its
#: thirty-odd temporaries hold at most 1 MB each (float32). Blocks of 2^15 to 2^18 pairs measured the same
#: CPU time on one thread; the largest keeps the count of parallel regions (one per op and block) about as
#: low as whole (rows, K) temporaries with 2+ threads.
L_AUX_BLOCK = 1 << 18


def _as(v: Coefficient, dtype: torch.dtype) -> Coefficient:
    """A coefficient in the statistics' dtype; a 0-d tensor on CPU without gradient as a Python float
    (reading it costs nothing there, and float operands save tensor ops per call: measured 6-24% per
    corrected layer). Not under ``torch.compile``: there ``float(v)`` would break the graph (a tensor read),
    and the compiler fuses the tensor operands anyway."""
    if isinstance(v, Tensor):
        plain = v.dim() == 0 and v.device.type == "cpu" and not v.requires_grad
        if plain and not torch.compiler.is_compiling():
            return float(v)
        return v.to(dtype)
    return float(v)

"""Straightforward, loop-based reference implementations (float64 numpy) for checking bncorrect's math."""

from __future__ import annotations

import numpy as np


def corrected_bn_reference(x, mu_e, var_e, gamma, b, eps, alpha, beta):
    """DESIGN §2, one (example, channel) at a time. alpha/beta: scalars or per-channel arrays."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (c,))
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), (c,))
    y = np.empty_like(x)
    for i in range(n):
        for ch in range(c):
            xs = x[i, ch]
            if x.ndim == 2:
                mu_i, var_i = float(xs), 0.0
            else:
                flat = xs.ravel()
                mu_i = flat.sum() / flat.size
                var_i = ((flat - mu_i) ** 2).sum() / flat.size
            d = mu_i - mu_e[ch]
            a, bb = alpha[ch], beta[ch]
            mu_hat = mu_e[ch] + a * d
            var_hat = bb * var_i + (1 - bb) * var_e[ch] + bb * (1 - bb) * d * d
            g = 1.0 if gamma is None else gamma[ch]
            sh = 0.0 if b is None else b[ch]
            y[i, ch] = g * (xs - mu_hat) / np.sqrt(var_hat + eps) + sh
    return y


def example_weighing_ex2_reference(x, mu_e, var_e, gamma, b, eps, alpha):
    """Four Things (002) sec. 3.1 parameterization: blend the mean and E[x^2] with weight alpha."""
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(range(2, x.ndim))
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    mu_i = x.mean(axis=axes).reshape(shape) if axes else x
    ex2_i = (x**2).mean(axis=axes).reshape(shape) if axes else x**2
    cshape = (1, -1) + (1,) * (x.ndim - 2)
    mu_e = mu_e.reshape(cshape)
    ex2_e = (var_e + mu_e.ravel() ** 2).reshape(cshape)
    mu = alpha * mu_i + (1 - alpha) * mu_e
    var = alpha * ex2_i + (1 - alpha) * ex2_e - mu**2
    return gamma.reshape(cshape) * (x - mu) / np.sqrt(var + eps) + b.reshape(cshape)


def l_aux_reference(x, mu_e, var_e, eps, alpha, beta):
    """EvalNorm eq. 9 for one normalization batch, straightforwardly in float64."""
    x = np.asarray(x, dtype=np.float64)
    axes = (0, *range(2, x.ndim))
    cshape = (1, -1) + (1,) * (x.ndim - 2)
    mu_b = x.mean(axis=axes).reshape(cshape)
    var_b = x.var(axis=axes).reshape(cshape)
    target = (x - mu_b) / np.sqrt(var_b + eps)
    est_axes = tuple(range(2, x.ndim))
    if est_axes:
        mu_i = x.mean(axis=est_axes, keepdims=True)
        var_i = x.var(axis=est_axes, keepdims=True)
    else:
        mu_i, var_i = x, np.zeros_like(x)
    me, ve = mu_e.reshape(cshape), var_e.reshape(cshape)
    d = mu_i - me
    mu_hat = me + alpha * d
    var_hat = beta * var_i + (1 - beta) * ve + beta * (1 - beta) * d**2
    estimate = (x - mu_hat) / np.sqrt(var_hat + eps)
    return float(np.abs(target - estimate).mean())

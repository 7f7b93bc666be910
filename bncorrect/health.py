"""Whether a BN layer's stored statistics and affine parameters can be used at all.

A layer can be corrected only when its running mean, running variance, scale and shift are finite and its
running variance is non-negative: with a NaN variance every output of the layer is NaN, and a negative one
makes ``sqrt(var + eps)`` NaN. :func:`statistics_problem` says what is wrong (or None); the PyTorch layer
finder and the ONNX node finder both call it, so ``inspect`` reports the same reason for either format.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (any dtype, any device)
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _channels(mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(int(i)) for i in idx[:5])
    return f"channel {shown}" if idx.size == 1 else f"channels {shown}{' ...' if idx.size > 5 else ''}"


def statistics_problem(
    running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None
) -> str | None:
    """Why these statistics/parameters are unusable (e.g. ``"running_var is NaN in channels 0, 3"``), or
    None when they are fine. ``weight``/``bias`` may be None (no affine)."""
    for label, value in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if value is None:
            continue
        a = _as_array(value).reshape(-1)
        nan, inf = np.isnan(a), np.isinf(a)
        if nan.any():
            return f"{label} is NaN in {_channels(nan)}"
        if inf.any():
            return f"{label} is infinite in {_channels(inf)}"
        if label == "running_var" and (a < 0).any():
            return f"running_var is negative in {_channels(a < 0)}"
    return None


STATS_HINT = (
    "the checkpoint's statistics are broken (training diverged, or the file was edited); recompute them "
    "with `bncorrect recalibrate MODEL --data DATA -o fixed.pt` or use an earlier checkpoint"
)

__all__ = ["STATS_HINT", "statistics_problem"]

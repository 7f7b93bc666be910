r"""Full Batch Normalization for nodes linear in the network input (FBN paper, sec. 3, eq. 4).

For a node z = w^T x + b that is a linear function of the network input x (the first Linear or Conv layer's
output), the statistics BN wants can be taken over the *whole training set* instead of a minibatch: with
mu = E[x] and C = Var(x) (the input's mean vector and covariance over the dataset, computed once)::

    E[z]   = w^T mu + b            Var[z] = w^T C w
    FBN(z) = gamma * (z - E[z]) / sqrt(Var[z] + eps) + beta
           = gamma * w^T (x - mu) / sqrt(w^T C w + eps) + beta

Both statistics are differentiable functions of w (and b), so the layer trains by backpropagation through
them, and it behaves identically in training and inference (no moving averages, no train/test gap, no
batch-size dependence). Choices where the paper is silent: C is the population covariance (divided by
the number of samples), so Var[z] is exactly the biased variance of z over the dataset that BN would use
with the whole dataset as its batch; eps (default 1e-5, as BN) is added as in BN -- eps = 0 is eq. 4.

For a convolution, every output position is one value of the node: z = w^T p + b with p the input patch
(im2col: ``conv_patches``, the same padding, stride and dilation as the conv). mu and C are the moments
of the patches over all examples and positions (padded positions included, as the conv sees them), so
E[z], Var[z] are the statistics of the conv output over examples and positions, as BN2d computes them.
Grouped convolutions use each group's block of C.

:func:`input_moments` streams a data loader and merges per-batch moments in float64 (Chan et al.'s
pairwise update: n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta n_b / n,
M2 = M2_a + M2_b + delta delta^T n_a n_b / n, C = M2 / n). The statistics are exact for the data the
moments were computed on: with data augmentation, compute them over augmented data; they must be recomputed
if the input pipeline changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import correction as C
from ..errors import DataError, UsageError

LinearNode = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d

__all__ = ["FullBatchNorm", "MomentAccumulator", "Moments", "conv_patches", "input_moments", "layer_rows"]


@dataclass(frozen=True)
class Moments:
    """Moments of the input rows a linear node sees: ``count`` rows, ``mean`` (D,), ``cov`` (D, D)."""

    count: int
    mean: Tensor
    cov: Tensor


class MomentAccumulator:
    """Streaming mean and population covariance of rows (M, D), in float64, merged Chan-style."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, rows: Tensor) -> None:
        """Add the rows of ``rows`` (M, D)."""
        if rows.dim() != 2:
            raise DataError(f"expected rows of shape (M, D), got {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        r = rows.detach().to(device=self.device or rows.device, dtype=torch.float64)
        n_b = r.shape[0]
        mean_b = r.mean(0)
        dev = r - mean_b
        m2_b = dev.T @ dev
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise DataError(f"rows have {mean_b.numel()} features, earlier ones had {self.mean.numel()}")
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def result(self) -> Moments:
        """The moments so far (population covariance)."""
        if self.mean is None or self.m2 is None or self.count == 0:
            raise DataError("no data: the loader yielded no examples")
        return Moments(self.count, self.mean.clone(), self.m2 / self.count)


def _check_layer(layer: nn.Module) -> LinearNode:
    if not isinstance(layer, LinearNode):
        raise UsageError(
            f"Full Batch Norm needs an nn.Linear or nn.Conv1d/2d/3d layer, got {type(layer).__name__}"
        )
    return layer


def input_features(layer: LinearNode) -> int:
    """D: the length of one input row (Linear: in_features; conv: in_channels * kernel volume)."""
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    return int(layer.in_channels * math.prod(layer.kernel_size))


def conv_patches(x: Tensor, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Tensor:
    """im2col: every input patch the conv sees, as rows (N * positions, in_channels * kernel volume).

    Row order is (example, output position); column order is (in_channel, kernel offsets) -- the order of
    ``conv.weight.reshape(out_channels, -1)`` for ``groups=1``.
    """
    nd = x.dim() - 2
    if nd != len(conv.kernel_size) or x.shape[1] != conv.in_channels:
        raise DataError(
            f"input of shape {tuple(x.shape)} does not fit {type(conv).__name__} with "
            f"{conv.in_channels} input channels"
        )
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        x = x.unfold(2 + i, (k - 1) * d + 1, s)
        if d > 1:
            x = x[..., ::d]
    perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.permute(perm).reshape(-1, input_features(conv))


def layer_rows(layer: LinearNode, x: Tensor) -> Tensor:
    """The input rows (M, D) whose linear images are the values of ``layer``'s output nodes."""
    if isinstance(layer, nn.Linear):
        if x.dim() < 1 or x.shape[-1] != layer.in_features:
            raise DataError(
                f"input of shape {tuple(x.shape)} does not fit nn.Linear with {layer.in_features} features"
            )
        return x.reshape(-1, layer.in_features)
    return conv_patches(x, layer)


def _batch_input(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise DataError(
        f"cannot find the input in a batch of type {type(batch).__name__}",
        hint="yield tensors or (input, label) pairs, or pass transform= to extract the input",
    )


def input_moments(
    layer: nn.Module,
    data: Iterable[Any],
    *,
    transform: Callable[[Any], Tensor] | None = None,
    device: torch.device | str | None = None,
) -> Moments:
    """Mean and population covariance (float64) of the rows ``layer`` sees, over all of ``data``.

    ``data`` yields tensors or (input, ...) tuples; ``transform`` (optional) maps a batch to the layer's
    input (e.g. fixed preprocessing). For a conv layer the rows are its input patches (:func:`conv_patches`).
    """
    node = _check_layer(layer)
    acc = MomentAccumulator(device)
    with torch.no_grad():
        for batch in data:
            x = transform(batch) if transform is not None else _batch_input(batch)
            acc.update(layer_rows(node, x))
    return acc.result()


class FullBatchNorm(nn.Module):
    """``layer`` (Linear or Conv) followed by normalization with its exact whole-dataset statistics.

    ``weight``/``bias`` are gamma/beta (shape (out,)); ``input_mean``, ``input_cov`` (float64 buffers, in
    the ``state_dict``) are the input moments. Output: ``gamma * (layer(x) - E[z]) / sqrt(Var[z] + eps) +
    beta`` in training and eval alike. Use :meth:`from_data` or :meth:`set_moments` before the first forward.
    """

    def __init__(
        self, layer: nn.Module, moments: Moments | None = None, *, eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__()
        self.layer = _check_layer(layer)
        self.eps = float(eps)
        self.affine = bool(affine)
        self.num_features = int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)
        d = input_features(self.layer)
        dev = self.layer.weight.device
        self.register_buffer("input_mean", torch.zeros(d, dtype=torch.float64, device=dev))
        self.register_buffer("input_cov", torch.zeros(d, d, dtype=torch.float64, device=dev))
        self.register_buffer("input_count", torch.zeros((), dtype=torch.long, device=dev))
        if affine:
            dt = self.layer.weight.dtype
            self.weight = nn.Parameter(torch.ones(self.num_features, device=dev, dtype=dt))
            self.bias = nn.Parameter(torch.zeros(self.num_features, device=dev, dtype=dt))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if moments is not None:
            self.set_moments(moments)

    @classmethod
    def from_data(
        cls,
        layer: nn.Module,
        data: Iterable[Any],
        *,
        eps: float = 1e-5,
        affine: bool = True,
        transform: Callable[[Any], Tensor] | None = None,
    ) -> FullBatchNorm:
        """Compute the input moments over ``data`` (see :func:`input_moments`) and build the layer."""
        return cls(layer, input_moments(layer, data, transform=transform), eps=eps, affine=affine)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, n={int(self.input_count)}"

    @torch.no_grad()
    def set_moments(self, moments: Moments) -> None:
        """Install input moments (from :func:`input_moments`)."""
        d = self.input_mean.numel()
        if tuple(moments.mean.shape) != (d,) or tuple(moments.cov.shape) != (d, d):
            raise UsageError(
                f"moments of shape mean {tuple(moments.mean.shape)}, cov {tuple(moments.cov.shape)} do not "
                f"fit "
                f"{type(self.layer).__name__} with {d} input features per row",
                hint="compute them with bncorrect.nn.input_moments(layer, data) for this very layer",
            )
        if moments.count < 1 or not (
            torch.isfinite(moments.mean).all() and torch.isfinite(moments.cov).all()
        ):
            raise UsageError("input moments are empty or not finite")
        self.input_mean.copy_(moments.mean)
        self.input_cov.copy_(moments.cov)
        self.input_count.fill_(int(moments.count))

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(E[z], Var[z]) per output node over the dataset, float64, differentiable in the layer's params."""
        if int(self.input_count) == 0:
            raise UsageError(
                "FullBatchNorm has no input moments yet",
                hint="build it with FullBatchNorm.from_data(layer, loader) or call set_moments(...)",
            )
        layer = self.layer
        groups = 1 if isinstance(layer, nn.Linear) else int(layer.groups)
        w = layer.weight.to(torch.float64).reshape(groups, self.num_features // groups, -1)  # (g, o, Dg)
        dg = w.shape[-1]
        mu = self.input_mean.to(torch.float64).reshape(groups, dg)
        cov = self.input_cov.to(torch.float64).reshape(groups, dg, groups, dg)
        blocks = torch.diagonal(cov, dim1=0, dim2=2).permute(2, 0, 1)  # (g, Dg, Dg): each group's block
        mean = torch.einsum("god,gd->go", w, mu).reshape(-1)
        var = torch.einsum("god,gde,goe->go", w, blocks, w).reshape(-1).clamp_min(0.0)
        if layer.bias is not None:
            mean = mean + layer.bias.to(torch.float64)
        return mean, var

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer(x)
        mean, var = self.statistics()
        s, t = C.scale_shift(mean, var, self.eps, self.weight, self.bias)
        s, t = s.to(z.dtype), t.to(z.dtype)
        if isinstance(self.layer, nn.Linear):
            return torch.addcmul(t, z, s)
        return torch.addcmul(C.expand_to(t, z), z, C.expand_to(s, z))

"""The corrected BatchNorm layer for PyTorch models, and module swapping.

:class:`CorrectedNorm` wraps one BN layer (kept as its ``norm`` child, untouched) and adds two buffers,
``alpha`` and ``beta``. In training mode it *is* the original layer. In eval mode it normalizes with the
corrected statistics of :mod:`bncorrect.correction`:

- for the plain BN types of :data:`REGISTRY` it computes ``y = x * s + t`` directly;
- for anything else that looks like BN (a subclass whose forward adds behaviour after normalizing, e.g.
  an activation; a non-subclass with ``weight``/``bias``/``running_mean``/``running_var``/``eps`` such as
  torchvision's FrozenBatchNorm2d) it feeds the original layer the remapped input
  ``x' = (x - mu_hat) * k + mu_E`` (see :func:`bncorrect.correction.input_map`), so whatever the layer does
  after normalizing still happens.

:func:`correct_model` swaps every supported layer (recursively, timm-style) and returns the model;
:func:`find_norm_layers` lists every BN layer, with the reason when one cannot be corrected.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from . import correction as C
from .errors import NoBatchNormError, UsageError
from .health import statistics_problem

Mode = Literal["corrected", "batch"]

#: Layer types whose eval forward is exactly ``F.batch_norm`` with the running statistics: corrected with
#: the direct formula. Every other BN-like layer is corrected through its own forward (input remapping).
REGISTRY: dict[type[nn.Module], str] = {
    nn.BatchNorm1d: "direct",
    nn.BatchNorm2d: "direct",
    nn.BatchNorm3d: "direct",
    nn.SyncBatchNorm: "direct",
}

_BN_ATTRS = ("weight", "bias", "running_mean", "running_var", "eps")


def _strategy(module: nn.Module) -> str:
    kind = REGISTRY.get(type(module))
    if kind is not None:
        return kind
    if isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward:
        return "direct"  # e.g. lazy BN after materialisation, or a subclass that only renames
    return "through-forward"


def is_batchnorm_like(module: nn.Module) -> bool:
    """True for torch BN layers (and subclasses) and for duck-typed BN such as FrozenBatchNorm2d."""
    if isinstance(module, CorrectedNorm | _InstanceNorm):
        return False
    if isinstance(module, _BatchNorm):
        return True
    return all(hasattr(module, a) for a in _BN_ATTRS) and isinstance(
        getattr(module, "running_mean", None), Tensor
    )


def not_correctable_reason(module: nn.Module) -> str | None:
    """Why a BN-like layer cannot be corrected, or None when it can."""
    rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if rm is None or rv is None or not getattr(module, "track_running_stats", True):
        return (
            "track_running_stats=False: it normalizes with batch statistics at inference; nothing to correct"
        )
    if rm.dim() != 1 or rv.shape != rm.shape:
        return f"running statistics of unexpected shape {tuple(rm.shape)}"
    return None


@dataclass
class NormLayer:
    """One BN layer of a model, as :func:`find_norm_layers` reports it.

    ``stats_problem`` says what is wrong with the stored statistics or affine parameters (NaN, Inf, a
    negative variance: :func:`bncorrect.health.statistics_problem`), or None. Such a layer is reported
    ``correctable=False`` with that ``reason`` (unless a structural reason comes first), yet
    :func:`correct_model` still wraps it, so that ``recalibrate`` can recompute its statistics.
    """

    name: str
    type: str
    channels: int
    eps: float
    momentum: float | None
    affine: bool
    correctable: bool
    reason: str | None
    module: nn.Module = field(repr=False)
    strategy: str = "direct"
    stats_problem: str | None = None

    def summary(self) -> dict[str, object]:
        """JSON-friendly description (without the module)."""
        out: dict[str, object] = {
            "name": self.name,
            "type": self.type,
            "channels": self.channels,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "correctable": self.correctable,
            "reason": self.reason,
            "stats_problem": self.stats_problem,
        }
        rm = getattr(self.module, "running_mean", None)
        rv = getattr(self.module, "running_var", None)
        if isinstance(rm, Tensor) and isinstance(rv, Tensor) and rm.numel():
            out["running_mean_abs_mean"] = float(rm.float().abs().mean())
            out["running_var_mean"] = float(rv.float().mean())
            out["running_var_min"] = float(rv.float().min())
            out["finite"] = bool(torch.isfinite(rm).all() and torch.isfinite(rv).all())
        return out


def _inner(module: nn.Module) -> nn.Module:
    return module.norm if isinstance(module, CorrectedNorm) else module


def _stats_problem(module: nn.Module) -> str | None:
    """:func:`bncorrect.health.statistics_problem` of a BN-like layer's tensors (None without statistics)."""
    rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        return None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return statistics_problem(
        rm,
        rv,
        weight if isinstance(weight, Tensor) else None,
        bias if isinstance(bias, Tensor) else None,
    )


def find_norm_layers(model: nn.Module) -> list[NormLayer]:
    """Every BN layer of ``model`` (already-corrected ones included), in module order.

    A layer is ``correctable`` when it is structurally correctable (:func:`not_correctable_reason`) and its
    stored statistics and affine parameters are usable (``stats_problem`` is None)."""
    layers: list[NormLayer] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            inner = _inner(child)
            if isinstance(child, CorrectedNorm) or is_batchnorm_like(child):
                structural = not_correctable_reason(inner)
                rm = getattr(inner, "running_mean", None)
                weight = getattr(inner, "weight", None)
                problem = _stats_problem(inner)
                reason = structural if structural is not None else problem
                channels = (
                    int(rm.numel())
                    if isinstance(rm, Tensor)
                    else int(getattr(inner, "num_features", weight.numel() if weight is not None else 0))
                )
                layers.append(
                    NormLayer(
                        name=name,
                        type=type(inner).__name__,
                        channels=channels,
                        eps=float(inner.eps),
                        momentum=getattr(inner, "momentum", None),
                        affine=getattr(inner, "weight", None) is not None,
                        correctable=reason is None,
                        reason=reason,
                        module=child,
                        strategy=_strategy(inner),
                        stats_problem=problem,
                    )
                )
            else:
                visit(child, name)

    visit(model, "")
    return layers


class CorrectedNorm(nn.Module):
    """A BN layer whose eval-mode normalization blends in each example's own statistics.

    ``norm`` is the original layer; ``alpha`` and ``beta`` are buffers (0-d or shape (C,)).
    ``mode`` (not saved) is ``"corrected"`` (default) or ``"batch"``: training-mode normalization over
    groups of ``group_size`` examples (all of the batch when None) without touching running statistics,
    used by the estimator and as the training-mode reference. In that mode ``observer`` (not saved), when
    set, is called with ``(x, mu_i, var_i, mu_b, var_b)`` for every batch.
    """

    def __init__(
        self, norm: nn.Module, alpha: float | Tensor = 0.0, beta: float | Tensor | None = None
    ) -> None:
        super().__init__()
        reason = not_correctable_reason(norm)
        if reason is not None:
            raise NoBatchNormError(f"{type(norm).__name__} cannot be corrected: {reason}")
        self.norm = norm
        self.strategy = _strategy(norm)
        self.mode: Mode = "corrected"
        self.group_size: int | None = None
        self.observer: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None] | None = None
        self.register_buffer("alpha", torch.zeros(()))
        self.register_buffer("beta", torch.zeros(()))
        self.set_coefficients(alpha, alpha if beta is None else beta)

    @property
    def num_channels(self) -> int:
        return int(self.norm.running_mean.numel())

    def set_coefficients(self, alpha: float | Tensor, beta: float | Tensor) -> None:
        """Set alpha and beta (scalars or (C,) vectors in [0, 1])."""
        rm = self.norm.running_mean
        dtype = torch.float64 if rm.dtype == torch.float64 else torch.float32
        for label, value in (("alpha", alpha), ("beta", beta)):
            t = torch.as_tensor(value, dtype=dtype).detach().clone()
            if t.dim() > 1 or (t.dim() == 1 and t.numel() != self.num_channels):
                raise UsageError(
                    f"{label} must be a scalar or a vector of length {self.num_channels}, got shape "
                    f"{tuple(t.shape)}"
                )
            if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
                raise UsageError(f"{label} must lie in [0, 1], got {t.tolist()}")
            setattr(self, label, t.to(rm.device))
        self._remember_identity()

    def _remember_identity(self) -> bool:
        """Read whether alpha = beta = 0 from the buffers and keep the answer as a Python bool, for
        :meth:`is_identity` under ``torch.compile``."""
        identity = not bool(self.alpha.any()) and not bool(self.beta.any())
        self._identity = identity
        return identity

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]
        self._remember_identity()

    def extra_repr(self) -> str:
        a = self.alpha.tolist() if self.alpha.dim() == 0 else f"vector[{self.alpha.numel()}]"
        b = self.beta.tolist() if self.beta.dim() == 0 else f"vector[{self.beta.numel()}]"
        return f"alpha={a}, beta={b}, strategy={self.strategy}"

    def is_identity(self) -> bool:
        """True when the correction is a no-op (alpha = beta = 0 everywhere).

        Under ``torch.compile`` this is the answer read last from the buffers (by :meth:`set_coefficients`,
        ``load_state_dict`` or an eager call), a Python bool that dynamo guards on, so the compiled graph has
        no data-dependent branch (``bool(tensor)`` breaks the graph at every corrected layer). Change the
        coefficients of a compiled model through :meth:`set_coefficients` or ``load_state_dict`` (or run it
        once eagerly after writing the buffers in place)."""
        if torch.compiler.is_compiling():
            known = getattr(self, "_identity", None)  # None: a layer pickled before the attribute existed
            if known is not None:
                return bool(known)
            return not bool(self.alpha.any()) and not bool(self.beta.any())
        return self._remember_identity()

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise UsageError(
                f"input of shape {tuple(x.shape)} does not fit a norm layer with {self.num_channels} channels"
            )

    def normalization_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (mean, var) this layer normalizes ``x`` with in eval mode: (N, C) tensors."""
        self._check_input(x)
        mu_i, var_i = C.example_stats(x)
        if self.mode == "batch":
            mu_b, var_b = C.group_stats(mu_i, var_i, self.group_size)
            if self.observer is not None:
                self.observer(x, mu_i, var_i, mu_b, var_b)
            return mu_b, var_b
        dt = mu_i.dtype
        return C.corrected_stats(
            mu_i,
            var_i,
            self.norm.running_mean.to(dt),
            self.norm.running_var.to(dt),
            self.alpha.to(dt),
            self.beta.to(dt),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.training or (self.mode == "corrected" and self.is_identity()):
            return self.norm(x)
        norm = self.norm
        if self.strategy == "direct" and self.mode == "corrected":
            self._check_input(x)
            return C.corrected_batch_norm(
                x, norm.running_mean, norm.running_var, norm.weight, norm.bias, float(norm.eps),
                self.alpha, self.beta,
            )  # fmt: skip
        mean, var = self.normalization_stats(x)
        if self.strategy == "direct":
            return C.normalize(x, mean, var, float(norm.eps), norm.weight, norm.bias)
        k, m = C.input_map(mean, var, norm.running_mean, norm.running_var, float(norm.eps))
        x_mapped = (x.to(k.dtype) * C.expand_to(k, x) + C.expand_to(m, x)).to(x.dtype)
        return norm(x_mapped)


Coefficients = float | Tensor | Mapping[str, float | Tensor]


def _lookup(value: Coefficients, name: str) -> float | Tensor | None:
    if isinstance(value, Mapping):
        return value.get(name)
    return value


def correct_model(
    model: nn.Module,
    alpha: Coefficients = 0.0,
    beta: Coefficients | None = None,
    *,
    layers: list[str] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Wrap every correctable BN layer of ``model`` in :class:`CorrectedNorm`, in place; returns the model.

    Layers whose only problem is their stored statistics (``NormLayer.stats_problem``: NaN, Inf, negative
    variance) are wrapped too: recalibration recomputes those statistics through the wrapper. Refusing
    such models is the commands' business.

    ``alpha``/``beta`` are one value for every layer or a mapping from layer name to value (layers missing
    from a mapping get 0, i.e. stay plain BN in effect). ``beta`` defaults to ``alpha``. Layers that are
    already wrapped get their coefficients updated. With ``strict`` a model without any correctable BN
    layer raises :class:`NoBatchNormError`.
    """
    if beta is None:
        beta = alpha
    found = find_norm_layers(model)
    # structurally correctable layers, broken statistics included: recalibration must be able to wrap them
    correctable = [
        ly
        for ly in found
        if not_correctable_reason(_inner(ly.module)) is None and (layers is None or ly.name in layers)
    ]
    if strict and not correctable:
        if found:
            reasons = "; ".join(f"{ly.name}: {ly.reason}" for ly in found)
            raise NoBatchNormError(f"no BatchNorm layer can be corrected ({reasons})")
        raise NoBatchNormError(
            "the model has no BatchNorm layer",
            hint="bncorrect corrects BatchNorm layers that keep running statistics; if BN was fused into "
            "the preceding convolutions, load the unfused model",
        )
    for ly in correctable:
        a = _lookup(alpha, ly.name)
        b = _lookup(beta, ly.name)
        a = 0.0 if a is None else a
        b = a if b is None else b
        if isinstance(ly.module, CorrectedNorm):
            ly.module.set_coefficients(a, b)
        else:
            wrapped = CorrectedNorm(ly.module, a, b)
            wrapped.train(ly.module.training)
            _set_submodule(model, ly.name, wrapped)
    return model


def strip_corrections(model: nn.Module) -> nn.Module:
    """Undo :func:`correct_model` in place: every CorrectedNorm is replaced by its original layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CorrectedNorm) and name:
            _set_submodule(model, name, module.norm)
    return model


class ExportBatchNorm(_BatchNorm):
    """Plain eval-mode BatchNorm of any input rank: what a BN-like layer that is not a ``_BatchNorm``
    (torchvision's ``FrozenBatchNorm2d``: ``x * scale + shift`` from its buffers) becomes for ONNX export, so
    that the exporter writes a BatchNormalization node (with the layer's own parameter names) that the
    rewrite can correct. Same function: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of rank >= 2, got {input.dim()}")


def as_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BN-like layer that is not a ``_BatchNorm`` (e.g. ``FrozenBatchNorm2d``) by an
    :class:`ExportBatchNorm` computing the same function, recursively, in place; returns ``model``.
    Every parameter and buffer is copied explicitly (weight, bias, running_mean, running_var, eps)."""
    for ly in find_norm_layers(model):
        inner = _inner(ly.module)
        if isinstance(inner, _BatchNorm) or not_correctable_reason(inner) is not None:
            continue
        rm = inner.running_mean
        weight, bias = getattr(inner, "weight", None), getattr(inner, "bias", None)
        new = ExportBatchNorm(rm.numel(), eps=float(inner.eps), affine=weight is not None).to(rm.device)
        new = new.to(rm.dtype)
        with torch.no_grad():
            new.running_mean.copy_(rm)
            new.running_var.copy_(inner.running_var)
            if weight is not None:
                new.weight.copy_(weight.detach())
                new.bias.copy_(bias.detach() if bias is not None else torch.zeros_like(rm))
        new.eval()
        if isinstance(ly.module, CorrectedNorm):
            ly.module.norm = new
            ly.module.strategy = _strategy(new)
        else:
            _set_submodule(model, ly.name, new)
    return model


def corrected_layers(model: nn.Module) -> dict[str, CorrectedNorm]:
    """Name -> CorrectedNorm for every corrected layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CorrectedNorm)}


def coefficients(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Name -> (alpha, beta) for every corrected layer."""
    return {n: (m.alpha.detach().cpu(), m.beta.detach().cpu()) for n, m in corrected_layers(model).items()}


@contextlib.contextmanager
def normalization_mode(
    model: nn.Module, mode: Mode, group_sizes: Mapping[str, int | None] | int | None = None
) -> Iterator[dict[str, CorrectedNorm]]:
    """Temporarily put every CorrectedNorm in ``mode`` (and the model in eval); restores everything after.

    ``group_sizes``: one normalization-batch size for every layer, or per layer name.
    """
    layers = corrected_layers(model)
    saved_modes = {n: (m.mode, m.group_size) for n, m in layers.items()}
    saved_training = {n: m.training for n, m in model.named_modules()}
    try:
        model.eval()
        for name, m in layers.items():
            m.mode = mode
            m.group_size = group_sizes.get(name) if isinstance(group_sizes, Mapping) else group_sizes
        yield layers
    finally:
        for name, (mode_, gs) in saved_modes.items():
            layers[name].mode = mode_
            layers[name].group_size = gs
        for name, m in model.named_modules():
            m.training = saved_training.get(name, m.training)


def uses_batch_statistics(module: nn.Module) -> bool:
    """True for a BN-like layer that normalizes with batch statistics in training *and* keeps none to
    correct (``track_running_stats=False``): bncorrect leaves it uncorrected, but a training-mode pass must
    let it normalize over groups of B examples, as it did in training."""
    if isinstance(module, CorrectedNorm) or not is_batchnorm_like(module):
        return False
    rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    return rm is None or rv is None or not getattr(module, "track_running_stats", True)


def batch_statistics_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every layer of ``model`` for which :func:`uses_batch_statistics` holds."""
    return {n: m for n, m in model.named_modules() if n and uses_batch_statistics(m)}


def _grouped_forward(module: nn.Module, forward: Callable[..., Tensor], size: int) -> Callable[..., Tensor]:
    """``module``'s forward with batch statistics taken over consecutive groups of ``size`` examples."""
    direct = _strategy(module) == "direct"

    def grouped(x: Tensor, *args: object, **kwargs: object) -> Tensor:
        if args or kwargs or x.dim() < 2 or x.shape[0] <= size:
            return forward(x, *args, **kwargs)
        if direct:  # plain BN types: the group statistics of the training-mode pass, in one go
            mu_i, var_i = C.example_stats(x)
            mu_b, var_b = C.group_stats(mu_i, var_i, size)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            return C.normalize(x, mu_b, var_b, float(module.eps), weight, bias)
        return torch.cat([forward(part) for part in x.split(size)])  # whatever else its forward does

    return grouped


@contextlib.contextmanager
def grouped_batch_statistics(
    model: nn.Module, group_sizes: Mapping[str, int] | int | None
) -> Iterator[dict[str, nn.Module]]:
    """Temporarily make every layer of :func:`batch_statistics_layers` normalize over consecutive groups of
    its group size (one size for all, or per layer name; a layer missing from a mapping, or ``None``, keeps
    the whole batch). Each module's own ``forward`` is shadowed by an instance attribute and restored
    afterwards, also on failure; nothing else of the model changes."""
    layers = batch_statistics_layers(model)
    missing = object()
    saved: dict[str, object] = {}
    try:
        for name, m in layers.items():
            size = group_sizes.get(name) if isinstance(group_sizes, Mapping) else group_sizes
            if size is None:
                continue
            saved[name] = m.__dict__.get("forward", missing)
            object.__setattr__(m, "forward", _grouped_forward(m, m.forward, int(size)))
        yield layers
    finally:
        for name, previous in saved.items():
            m = layers[name]
            if previous is missing:
                m.__dict__.pop("forward", None)
            else:
                object.__setattr__(m, "forward", previous)


def layer_batch_sizes(names: list[str], default: int, patterns: Mapping[str, int] | None) -> dict[str, int]:
    """Per-layer normalization batch size: the first glob ``pattern`` matching a layer name wins."""
    out = {}
    for name in names:
        size = default
        for pattern, b in (patterns or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                size = b
                break
        out[name] = size
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_running_stats(model: nn.Module, stats: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """Copy new running statistics (layer name -> (mean, var)) into ``model``'s BN layers in place, in the
    buffers' dtype and device (the inner BN of a corrected layer)."""
    layers = {ly.name: ly.module for ly in find_norm_layers(model)}
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            inner = getattr(layers[name], "norm", layers[name])
            inner.running_mean.copy_(mean.to(inner.running_mean))
            inner.running_var.copy_(var.to(inner.running_var))


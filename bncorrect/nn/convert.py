"""Swapping normalization layers in a model (timm-style), with the state carried over unchanged.

:func:`replace_modules` walks a model recursively and replaces every module for which ``make`` returns a new
one; the root itself may be replaced, so the (possibly new) root is returned, as timm's and torch's
``convert_sync_batchnorm`` do. :func:`transfer_state` hands every parameter and buffer of the old layer to
the new one *by name*, the same tensor objects (so an optimizer built before the swap keeps training them),
and checks that both have exactly the same parameter and buffer names: a converted model's ``state_dict``
has the same keys as the original, and a checkpoint of either loads into the other with ``strict=True``.
Forward hooks and pre-hooks registered on a replaced layer are not carried over.

:func:`convert_to_batchnorm` undoes every conversion of :mod:`bncorrect.nn`: each layer whose class names a
``plain_type`` (GhostBatchNorm*, BatchRenorm*, BatchGroupNorm*) becomes that plain ``nn.BatchNorm*d`` with
the same statistics and affine parameters. Every such layer's eval forward *is* plain BN with its running
statistics, so the eval outputs are unchanged (and bncorrect's post-hoc tools see ordinary BN layers).
:func:`convert_plain_batchnorm` is the other direction, shared by every ``convert_to_*``: each plain
``nn.BatchNorm1d/2d/3d`` becomes the class of a family with that ``plain_type``, built from the layer's
options (:func:`batchnorm_options`) and given its state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NoBatchNormError

__all__ = [
    "batchnorm_options",
    "convert_plain_batchnorm",
    "convert_to_batchnorm",
    "replace_modules",
    "transfer_state",
]


def transfer_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` every parameter and buffer of ``src`` (same objects, by name) and its training flag."""
    if set(src._parameters) != set(dst._parameters) or set(src._buffers) != set(dst._buffers):
        raise ValueError(
            f"{type(src).__name__} -> {type(dst).__name__}: parameter/buffer names differ "
            f"({sorted(src._parameters)} {sorted(src._buffers)} vs {sorted(dst._parameters)} "
            f"{sorted(dst._buffers)})"
        )
    for name, param in src._parameters.items():
        dst._parameters[name] = param
    for name, buf in src._buffers.items():
        dst._buffers[name] = buf
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst.train(src.training)
    return dst


def replace_modules(
    model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]
) -> tuple[nn.Module, list[str]]:
    """Replace, recursively, every module for which ``make(name, module)`` returns a new module.

    Replaced modules are not searched further. Returns the (possibly new) root and the replaced names.
    """
    replaced: list[str] = []

    def visit(module: nn.Module, name: str) -> nn.Module:
        new = make(name, module)
        if new is not None:
            replaced.append(name)
            return new
        for child_name, child in list(module.named_children()):
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    root = visit(model, "")
    return root, replaced


def batchnorm_options(module: _BatchNorm) -> dict[str, Any]:
    """The keyword arguments that build a BN layer like ``module``: eps, momentum, affine,
    track_running_stats, and the device and dtype of its running statistics (else of its weight)."""
    ref = module.running_mean if module.running_mean is not None else module.weight
    return {
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
        "device": None if ref is None else ref.device,
        "dtype": None if ref is None else ref.dtype,
    }


def convert_plain_batchnorm(
    model: nn.Module,
    family: Sequence[type[_BatchNorm]],
    build: Callable[[str, _BatchNorm, type[_BatchNorm]], nn.Module],
    *,
    what: str,
    strict: bool,
) -> nn.Module:
    """Swap every plain ``nn.BatchNorm1d/2d/3d`` (exact types) of ``model`` for ``build(name, module, cls)``,
    ``cls`` the class of ``family`` whose ``plain_type`` is the module's type; the new layer gets the old
    one's parameters and buffers (:func:`transfer_state`). Returns the (possibly new) root; with ``strict``
    a model without such a layer raises :class:`NoBatchNormError` (``what``: the family's name)."""
    by_plain = {cls.plain_type: cls for cls in family}  # type: ignore[attr-defined]

    def make(name: str, module: nn.Module) -> nn.Module | None:
        cls = by_plain.get(type(module))
        if cls is None:
            return None
        assert isinstance(module, _BatchNorm)
        return transfer_state(module, build(name, module, cls))

    root, replaced = replace_modules(model, make)
    if strict and not replaced:
        raise NoBatchNormError(f"the model has no nn.BatchNorm1d/2d/3d layer to convert to {what}")
    return root


def _plain_copy(module: _BatchNorm) -> nn.Module:
    plain_type: type[_BatchNorm] = type(module).plain_type  # type: ignore[attr-defined]
    return transfer_state(module, plain_type(module.num_features, **batchnorm_options(module)))


def convert_to_batchnorm(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace every :mod:`bncorrect.nn` BN-type layer by its plain ``nn.BatchNorm*d``; returns the model.

    With ``strict``, a model without any such layer raises :class:`NoBatchNormError`.
    """

    def make(_name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, _BatchNorm) and getattr(type(module), "plain_type", None) is not None:
            return _plain_copy(module)
        return None

    root, replaced = replace_modules(model, make)
    if strict and not replaced:
        raise NoBatchNormError(
            "the model has no bncorrect.nn normalization layer to convert back to BatchNorm"
        )
    return root

"""The fingerprint of a model's BatchNorm layers: which model a corrections file was made for.

A corrections file is only right for the model whose statistics it was computed on. File bytes cannot
tell (the same model as ``.pt``, ``.safetensors`` or an ONNX export has different bytes; two checkpoints of
one architecture have the same layer names and shapes), so the fingerprint is computed from what the
correction depends on, the BN layers' own numbers::

    digest(layer) = sha256(float32 bytes of eps, running_mean, running_var, weight, bias)
                    (weight = 1 and bias = 0 for a layer without affine, as exporters write them)
    fingerprint   = sha256 of the sorted layer digests, hex, first 32 characters

The layer digests are sorted, so neither layer names nor their order matter: a PyTorch model and its
ONNX export (whose BN nodes hold the same float32 parameters) have the same fingerprint, and any change
of a statistic (another checkpoint, a recalibration) changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

LENGTH = 32


def _f32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype="<f4").reshape(-1))


def layer_digest(eps: float, mean: Any, var: Any, weight: Any = None, bias: Any = None) -> str:
    """The digest of one layer (module docstring); ``weight``/``bias`` None means no affine."""
    m, v = _f32(mean), _f32(var)
    w = np.ones_like(m) if weight is None else _f32(weight)
    b = np.zeros_like(m) if bias is None else _f32(bias)
    h = hashlib.sha256()
    for part in (np.asarray([eps], dtype="<f4"), m, v, w, b):
        h.update(part.tobytes())
    return h.hexdigest()


def combine(digests: Iterable[str]) -> str:
    """The fingerprint of a model from its layer digests."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d.encode())
    return h.hexdigest()[:LENGTH]


def torch_fingerprint(model: Any) -> str:
    """Fingerprint of a PyTorch model: every BN layer with running statistics (corrected or not)."""
    from .layers import find_norm_layers, not_correctable_reason

    digests = []
    for ly in find_norm_layers(model):
        inner = getattr(ly.module, "norm", ly.module)
        if not_correctable_reason(inner) is not None:
            continue
        digests.append(
            layer_digest(
                float(inner.eps),
                inner.running_mean,
                inner.running_var,
                getattr(inner, "weight", None),
                getattr(inner, "bias", None),
            )
        )
    return combine(digests)


def onnx_fingerprint(model: Any) -> str:
    """Fingerprint of an ONNX graph: every BatchNormalization node whose four parameters are constants."""
    from .onnx_rewrite import _PARAMS, GraphIndex, _attr

    index = GraphIndex(model)
    digests = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 5:
            continue
        params = {}
        for key, name in zip(_PARAMS, node.input[1:5], strict=True):
            value, reason = index.resolve(name, key)
            if reason is not None or value is None:
                break
            params[key] = value
        else:
            eps = float(_attr(node, "epsilon", 1e-5))
            digests.append(layer_digest(eps, params["mean"], params["var"], params["scale"], params["bias"]))
    return combine(digests)


def short(fingerprint: str | None) -> str:
    """The first 12 characters, for messages."""
    return "(none)" if not fingerprint else fingerprint[:12]


__all__ = ["combine", "layer_digest", "onnx_fingerprint", "short", "torch_fingerprint"]

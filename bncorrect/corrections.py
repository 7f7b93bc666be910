"""Corrections files (DESIGN §5): per-layer alpha/beta (and recalibrated statistics) in safetensors.

For each corrected layer ``L`` the file holds tensors ``L.alpha`` and ``L.beta`` (0-d or shape [C]) and,
after ``recalibrate``, ``L.running_mean`` and ``L.running_var``. String metadata: ``format``
(``bncorrect/1``), ``method``, ``train_batch_size``, ``bncorrect_version``, ``model_sha256``,
``model_fingerprint`` (of the model's BN layers, :mod:`bncorrect.fingerprint`: a file is refused on another
model), ``model_file`` (its file name), ``data``, ``metrics`` (JSON). Layer names are PyTorch module
paths (``layer1.0.bn1``) or ONNX BN node names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import CorrectionsFileError

FORMAT = "bncorrect/1"
_FIELDS = ("alpha", "beta", "running_mean", "running_var")


@dataclass
class LayerCorrection:
    """What a corrections file says about one layer."""

    alpha: Tensor
    beta: Tensor
    running_mean: Tensor | None = None
    running_var: Tensor | None = None

    @property
    def is_identity(self) -> bool:
        """alpha = beta = 0 and no new statistics: the layer stays plain BN."""
        return (
            not bool(self.alpha.any())
            and not bool(self.beta.any())
            and self.running_mean is None
            and self.running_var is None
        )


@dataclass
class Corrections:
    """Per-layer corrections plus provenance metadata."""

    layers: dict[str, LayerCorrection]
    method: str
    train_batch_size: int | None = None
    model_sha256: str | None = None
    data: str | None = None
    metrics: dict[str, object] = field(default_factory=dict)
    version: str | None = None
    model_fingerprint: str | None = None
    model_file: str | None = None

    def check_model(
        self,
        fingerprint: str | None,
        *,
        model: str | Path | None = None,
        source: str | Path | None = None,
        force: bool = False,
    ) -> str | None:
        """Refuse these corrections on a model whose BN fingerprint (:mod:`bncorrect.fingerprint`)
        differs from the one they were made for, unless ``force``. Returns a warning when the check could
        not be made (a file from before fingerprints) or was overridden, else None."""
        from .errors import spell
        from .fingerprint import short

        if self.model_fingerprint is None or fingerprint is None:
            return (
                f"{source or 'the corrections'} records no model fingerprint (written by bncorrect "
                f"{self.version or 'before 0.1'}), so it cannot be checked to belong to "
                f"{model or 'this model'}"
            )
        if self.model_fingerprint == fingerprint:
            return None
        made_for = f" ({self.model_file})" if self.model_file else ""
        text = (
            f"the corrections were made for another model{made_for}: their BN fingerprint is "
            f"{short(self.model_fingerprint)}, {model or 'this model'}'s is {short(fingerprint)} (computed "
            "from every BN layer's statistics and parameters, so another checkpoint of the same "
            "architecture differs)"
        )
        if force:
            return f"{text}; applied anyway ({spell('force')})"
        raise CorrectionsFileError(
            text,
            path=source,
            hint=f"re-run the command that made them on {model or 'this model'}, or pass {spell('force')} "
            "if you know they fit",
        )

    @classmethod
    def uniform(
        cls,
        names: list[str],
        alpha: float,
        beta: float | None = None,
        *,
        method: str,
        train_batch_size: int | None = None,
        model_sha256: str | None = None,
    ) -> Corrections:
        """The same alpha/beta for every named layer."""
        b = alpha if beta is None else beta
        layers = {n: LayerCorrection(torch.tensor(float(alpha)), torch.tensor(float(b))) for n in names}
        return cls(layers, method, train_batch_size, model_sha256)

    def coefficients(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(alpha by layer, beta by layer)."""
        return (
            {n: c.alpha for n, c in self.layers.items()},
            {n: c.beta for n, c in self.layers.items()},
        )

    def validate(self, channels: Mapping[str, int], *, source: str | Path | None = None) -> None:
        """Check layer names and shapes against a model's BN layers (name -> number of channels)."""
        unknown = sorted(set(self.layers) - set(channels))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            known = ", ".join(list(channels)[:5]) + (" ..." if len(channels) > 5 else "")
            raise CorrectionsFileError(
                f"layers not in the model: {shown} (the model's BN layers: {known or 'none'})",
                path=source,
                hint="use the corrections file made for this model (see `bncorrect inspect MODEL`)",
            )
        for name, lc in self.layers.items():
            c = channels[name]
            for label in _FIELDS:
                t = getattr(lc, label)
                if t is None:
                    continue
                ok = (
                    t.dim() == 1 and t.numel() == c
                    if label.startswith("running")
                    else (t.dim() == 0 or (t.dim() == 1 and t.numel() == c))
                )
                if not ok:
                    raise CorrectionsFileError(
                        f"{name}.{label} has shape {list(t.shape)} but layer {name} has {c} channels",
                        path=source,
                        hint="the file was made for a different model",
                    )


def _check_values(name: str, label: str, t: Tensor, path: str | Path) -> None:
    if not torch.isfinite(t).all():
        raise CorrectionsFileError(
            f"{name}.{label} contains NaN or Inf", path=path, hint="re-run the command that made the file"
        )
    if label in ("alpha", "beta") and ((t < 0).any() or (t > 1).any()):
        raise CorrectionsFileError(
            f"{name}.{label} = {t.tolist()} lies outside [0, 1]",
            path=path,
            hint="alpha and beta must lie in [0, 1]; re-create the file with bncorrect",
        )
    if label == "running_var" and (t < 0).any():
        raise CorrectionsFileError(f"{name}.running_var has negative entries", path=path)


def save_corrections(corrections: Corrections, path: str | Path) -> Path:
    """Write ``corrections`` to ``path`` (.safetensors), atomically."""
    from safetensors.torch import save_file

    from . import __version__
    from .atomic import atomic_path

    tensors: dict[str, Tensor] = {}
    for name, lc in corrections.layers.items():
        for label in _FIELDS:
            t = getattr(lc, label)
            if t is not None:
                tensors[f"{name}.{label}"] = t.detach().to(torch.float32).cpu().clone().contiguous()
    metadata = {
        "format": FORMAT,
        "method": corrections.method,
        "train_batch_size": "" if corrections.train_batch_size is None else str(corrections.train_batch_size),
        "bncorrect_version": __version__,
        "model_sha256": corrections.model_sha256 or "",
        "model_fingerprint": corrections.model_fingerprint or "",
        "model_file": corrections.model_file or "",
        "data": corrections.data or "",
        "metrics": json.dumps(_jsonable(corrections.metrics)),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_corrections(path: str | Path) -> Corrections:
    """Read and validate a corrections file (format tag, names, value ranges)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CorrectionsFileError("file not found", path=path, hint="check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorrectionsFileError(
            f"not a readable safetensors file ({e})",
            path=path,
            hint="pass a corrections file written by bncorrect (rule, weight, estimate, ...)",
        ) from None
    fmt = metadata.get("format")
    if fmt != FORMAT:
        raise CorrectionsFileError(
            f"format tag is {fmt!r}, expected {FORMAT!r}: this is not a bncorrect corrections file"
            + (" (it looks like model weights)" if fmt is None else ""),
            path=path,
            hint="pass a corrections file written by bncorrect, or give the model as MODEL",
        )
    layers: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name, _, label = key.rpartition(".")
        if label not in _FIELDS or not name:
            raise CorrectionsFileError(f"unexpected tensor {key!r}", path=path)
        _check_values(name, label, t, path)
        layers.setdefault(name, {})[label] = t
    out: dict[str, LayerCorrection] = {}
    for name, parts in layers.items():
        if "alpha" not in parts or "beta" not in parts:
            if "running_mean" in parts and "running_var" in parts:
                parts.setdefault("alpha", torch.tensor(0.0))
                parts.setdefault("beta", torch.tensor(0.0))
            else:
                raise CorrectionsFileError(f"layer {name} lacks alpha or beta", path=path)
        if ("running_mean" in parts) != ("running_var" in parts):
            raise CorrectionsFileError(f"layer {name} has only one of running_mean/running_var", path=path)
        out[name] = LayerCorrection(**parts)
    try:
        metrics = json.loads(metadata.get("metrics") or "{}")
    except json.JSONDecodeError:
        raise CorrectionsFileError("metadata 'metrics' is not valid JSON", path=path) from None
    tbs = metadata.get("train_batch_size") or ""
    return Corrections(
        layers=out,
        method=metadata.get("method", ""),
        train_batch_size=int(tbs) if tbs.isdigit() else None,
        model_sha256=metadata.get("model_sha256") or None,
        data=metadata.get("data") or None,
        metrics=metrics,
        version=metadata.get("bncorrect_version"),
        model_fingerprint=metadata.get("model_fingerprint") or None,
        model_file=metadata.get("model_file") or None,
    )


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

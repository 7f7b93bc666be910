"""bncorrect: fix BatchNorm models trained with small normalization batches, after training.

The Python API mirrors the command line::

    import bncorrect
    model = bncorrect.load("model.pt", arch="my_models:resnet")          # or a pickled module / checkpoint
    out = bncorrect.estimate(model, "val.npz", train_batch_size=2, out="corrected.pt")
    corrected = bncorrect.load("corrected.pt", arch="my_models:resnet")  # eval mode, BN layers corrected

The names below are imported on first use (PEP 562), so ``import bncorrect`` and ``bncorrect --help`` do
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ExportOptions": "api",
    "OnnxModel": "api",
    "Outcome": "api",
    "apply": "api",
    "apply_to_module": "api",
    "estimate": "api",
    "inspect": "api",
    "open_model": "api",
    "recalibrate": "api",
    "rule": "api",
    "weight": "api",
    "retain_freed_memory": "allocator",
    "Corrections": "corrections",
    "LayerCorrection": "corrections",
    "load_corrections": "corrections",
    "save_corrections": "corrections",
    "BncorrectError": "errors",
    "CorrectedNorm": "layers",
    "correct_model": "layers",
    "find_norm_layers": "layers",
    "strip_corrections": "layers",
    "LoadedModel": "models",
    "load": "models",
    "load_model": "models",
    "save_checkpoint": "models",
}

_SUBMODULES = frozenset(
    {
        "allocator",
        "api",
        "atomic",
        "cli",
        "correction",
        "corrections",
        "data",
        "demo",
        "diagnosis",
        "errors",
        "estimation",
        "factories",
        "fingerprint",
        "health",
        "layers",
        "models",
        "nn",
        "onnx_export",
        "onnx_passes",
        "onnx_rewrite",
        "passes",
        "paths",
        "recalibration",
        "sample_models",
        "sweep",
    }
)

if TYPE_CHECKING:  # pragma: no cover
    from .allocator import retain_freed_memory
    from .api import (
        ExportOptions,
        OnnxModel,
        Outcome,
        apply,
        apply_to_module,
        estimate,
        inspect,
        open_model,
        recalibrate,
        rule,
        weight,
    )
    from .corrections import Corrections, LayerCorrection, load_corrections, save_corrections
    from .errors import BncorrectError
    from .layers import CorrectedNorm, correct_model, find_norm_layers, strip_corrections
    from .models import LoadedModel, load, load_model, save_checkpoint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBMODULES:  # bncorrect.api, bncorrect.data, ... without importing them first
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'bncorrect' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BncorrectError",
    "CorrectedNorm",
    "Corrections",
    "ExportOptions",
    "LayerCorrection",
    "LoadedModel",
    "OnnxModel",
    "Outcome",
    "__version__",
    "apply",
    "apply_to_module",
    "correct_model",
    "estimate",
    "find_norm_layers",
    "inspect",
    "load",
    "load_corrections",
    "load_model",
    "open_model",
    "recalibrate",
    "retain_freed_memory",
    "rule",
    "save_checkpoint",
    "save_corrections",
    "strip_corrections",
    "weight",
]

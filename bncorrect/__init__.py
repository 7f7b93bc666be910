"""bncorrect: fix BatchNorm models trained with small normalization batches, after training.

The Python API mirrors the command line::

    import bncorrect
    model = bncorrect.load("model.pt", arch="my_models:resnet")          # or a pickled module / checkpoint
    out = bncorrect.estimate(model, "val.npz", train_batch_size=2, out="corrected.pt")
    corrected = bncorrect.load("corrected.pt")                           # eval mode, BN layers corrected
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    "rule",
    "save_checkpoint",
    "save_corrections",
    "strip_corrections",
    "weight",
]

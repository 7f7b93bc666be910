"""bncorrect: fix BatchNorm models trained with small normalization batches, after training."""

from __future__ import annotations

__version__ = "0.1.0"

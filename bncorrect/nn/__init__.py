"""Training-side normalization layers from the papers behind bncorrect (issue #7).

``import bncorrect`` never imports this subpackage; the post-hoc tool does not need it. Every BN-type layer
here subclasses ``nn.BatchNorm``, keeps its ``state_dict`` keys and is plain BN in eval mode, so checkpoints
load into ``nn.BatchNorm*d`` and bncorrect's corrections apply (``convert_to_batchnorm`` swaps them back).

- Ghost Batch Normalization (Four Things 3.2): :class:`GhostBatchNorm1d/2d/3d`, :func:`convert_to_ghost`
- Batch Renormalization (Ioffe 2017): :class:`BatchRenorm1d/2d/3d`, :class:`Ramp`, :func:`convert_to_renorm`
- Batch-Group Normalization (Four Things 3.4): :class:`BatchGroupNorm1d/2d/3d`, :func:`convert_to_batch_group`
- Full Batch Normalization for linear nodes (FBN, sec. 3): :class:`FullBatchNorm`, :func:`input_moments`
- Weight decay on gamma/beta (Four Things 3.3): :func:`param_groups`
- Online EvalNorm estimation of alpha/beta during training (EvalNorm 3.4): :class:`OnlineEvalNorm`
- Cross-Iteration BN with Taylor compensation (CBN): :class:`CrossIterationBatchNorm2d`,
  :func:`convert_to_cross_iteration`
"""

from __future__ import annotations

from .batch_group import BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d, convert_to_batch_group
from .convert import convert_to_batchnorm
from .cross_iteration import CrossIterationBatchNorm2d, convert_to_cross_iteration
from .full_batch import FullBatchNorm, Moments, conv_patches, input_moments
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, convert_to_ghost
from .online import OnlineEvalNorm
from .renorm import (
    PAPER_D_MAX,
    PAPER_R_MAX,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    Ramp,
    convert_to_renorm,
)
from .weight_decay import param_groups

__all__ = [
    "PAPER_D_MAX",
    "PAPER_R_MAX",
    "BatchGroupNorm1d",
    "BatchGroupNorm2d",
    "BatchGroupNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CrossIterationBatchNorm2d",
    "FullBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "Moments",
    "OnlineEvalNorm",
    "Ramp",
    "conv_patches",
    "convert_to_batch_group",
    "convert_to_batchnorm",
    "convert_to_cross_iteration",
    "convert_to_ghost",
    "convert_to_renorm",
    "input_moments",
    "param_groups",
]

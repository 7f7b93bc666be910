"""Small BatchNorm networks for the sample checkpoints in ``sample_checkpoints/``.

Each factory takes no required arguments, so the models can be named on the command line as
``--arch bncorrect.sample_models:digits_cnn``. The weights are trained by ``scripts/make_samples.py``.

- :func:`digits_cnn`: 2-D conv net for scikit-learn's bundled digits (input (N, 1, 8, 8), 10 classes). It
  has BatchNorm2d layers, one BatchNorm1d on (N, C) features (rank-2 BN) and a Dropout layer.
- :func:`mnist1d_cnn`: 1-D conv net for MNIST-1D (input (N, 1, 40), 10 classes) with BatchNorm1d on
  (N, C, L) features.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["digits_cnn", "mnist1d_cnn"]


def _conv2d_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def _conv1d_block(c_in: int, c_out: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
    )


def digits_cnn(width: int = 16, hidden: int = 32, dropout: float = 0.1, num_classes: int = 10) -> nn.Module:
    """Conv net for 8x8 grayscale digits: three conv-BN-ReLU blocks, global average pool, an MLP head.

    Layout (module names are the state-dict prefixes)::

        features.0  Conv2d(1, w)   -> BatchNorm2d -> ReLU          8x8
        features.1  Conv2d(w, 2w)  -> BatchNorm2d -> ReLU
        features.2  MaxPool2d(2)                                   4x4
        features.3  Conv2d(2w, 2w) -> BatchNorm2d -> ReLU
        pool        AdaptiveAvgPool2d(1) -> Flatten                (N, 2w)
        head.0      Linear(2w, hidden, bias=False)
        head.1      BatchNorm1d(hidden)                            rank-2 BN on (N, C)
        head.2      ReLU
        head.3      Dropout(dropout)
        head.4      Linear(hidden, num_classes)
    """
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                _conv2d_block(1, width),
                _conv2d_block(width, 2 * width),
                nn.MaxPool2d(2),
                _conv2d_block(2 * width, 2 * width),
            ),
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            head=nn.Sequential(
                nn.Linear(2 * width, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            ),
        )
    )


def mnist1d_cnn(width: int = 32, num_classes: int = 10) -> nn.Module:
    """Conv net for MNIST-1D sequences of length 40: four conv-BN-ReLU blocks, average pool, Linear.

    Layout::

        features.0  Conv1d(1, w, 5)             -> BatchNorm1d -> ReLU    length 40
        features.1  Conv1d(w, w, 3, stride 2)   -> BatchNorm1d -> ReLU    20
        features.2  Conv1d(w, 2w, 3, stride 2)  -> BatchNorm1d -> ReLU    10
        features.3  Conv1d(2w, 2w, 3, stride 2) -> BatchNorm1d -> ReLU    5
        pool        AdaptiveAvgPool1d(1) -> Flatten                       (N, 2w)
        head        Linear(2w, num_classes)
    """
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                _conv1d_block(1, width, 5, 1),
                _conv1d_block(width, width, 3, 2),
                _conv1d_block(width, 2 * width, 3, 2),
                _conv1d_block(2 * width, 2 * width, 3, 2),
            ),
            pool=nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten()),
            head=nn.Linear(2 * width, num_classes),
        )
    )

"""Small BatchNorm networks for the sample checkpoints in ``sample_checkpoints/``.

Each factory takes no required arguments, so the models can be named on the command line as
``--arch bncorrect.sample_models:digits_cnn``. The weights are trained by ``scripts/make_samples.py``.

- :func:`digits_cnn`: 2-D conv net for scikit-learn's bundled digits (input (N, 1, 8, 8), 10 classes). It
  has BatchNorm2d layers, one BatchNorm1d on (N, C) features (rank-2 BN, in a head with a linear skip)
  and a Dropout layer.
- :func:`mnist1d_cnn`: 1-D conv net for MNIST-1D (input (N, 1, 40), 10 classes) with BatchNorm1d on
  (N, C, L) features.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["SkipHead", "digits_cnn", "mnist1d_cnn"]


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


class SkipHead(nn.Module):
    """Classifier head ``logits = linear(z) + branch(z)`` whose branch has a BatchNorm1d on (N, C) features.

    ``branch`` is ``Linear(bias=False) -> BatchNorm1d -> ReLU -> Dropout -> Linear(bias=False)``.

    Why the skip: with normalization batches of B = 2, a BatchNorm on (N, C) features normalizes two
    numbers per channel, so in training it outputs ``+-gamma + beta`` (up to eps) and passes almost no
    gradient (except huge spikes when the two values nearly coincide). Without the linear skip a digits
    network trained with B = 2 barely learns; with it, every B trains and the rank-2 BN is still there.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.branch = nn.Sequential(
            nn.Linear(in_features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes, bias=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z) + self.branch(z)


def digits_cnn(width: int = 16, hidden: int = 32, dropout: float = 0.1, num_classes: int = 10) -> nn.Module:
    """Conv net for 8x8 grayscale digits: three conv-BN-ReLU blocks, global average pool, a skip head.

    Layout (module names are the state-dict prefixes)::

        features.0     Conv2d(1, w, 3)   -> BatchNorm2d -> ReLU        8x8
        features.1     Conv2d(w, 2w, 3)  -> BatchNorm2d -> ReLU
        features.2     MaxPool2d(2)                                    4x4
        features.3     Conv2d(2w, 2w, 3) -> BatchNorm2d -> ReLU
        pool           AdaptiveAvgPool2d(1) -> Flatten                 (N, 2w)
        head.linear    Linear(2w, num_classes)                         skip
        head.branch.0  Linear(2w, hidden, bias=False)
        head.branch.1  BatchNorm1d(hidden)                             rank-2 BN on (N, C)
        head.branch.2  ReLU
        head.branch.3  Dropout(dropout)
        head.branch.4  Linear(hidden, num_classes, bias=False)         logits = head.linear + head.branch

    About 16k parameters (state dict ~70 KB).
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
            head=SkipHead(2 * width, hidden, num_classes, dropout),
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

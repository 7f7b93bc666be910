"""Cost of `estimate` against one training-mode forward pass, and its peak memory at 1x and 4x the data.

Prints ratios measured side by side in one run (runs interleaved, median of repeats):

- estimate / train-mode forward in batches of B (what the issue's speed bar names),
- estimate / train-mode forward in batches of 64 (the forward batch bncorrect itself uses, with
  normalization over ghost groups of B, so the comparison isolates the estimator's own work),
- peak RSS of a process running estimate over N and 4N streamed examples (data generated on the fly, so
  only the estimator's memory can grow).

Usage: python benchmarks/bench_estimate.py [--examples 2048] [--repeats 5] [--b 2]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections.abc import Iterator

import torch
from common import interleaved, machine, resnet_like
from torch import nn

from bncorrect.estimation import estimate_alpha_beta


def stream(n: int, batch: int, seed: int = 0) -> Iterator[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        yield (torch.randn(min(batch, n - start), 3, 32, 32, generator=g),)


def train_forward(model: nn.Module, n: int, batch: int) -> None:
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    with torch.no_grad():
        for (x,) in stream(n, 64):
            for start in range(0, x.shape[0], batch):
                ref(x[start : start + batch])


def run_estimate(model: nn.Module, n: int, b: int) -> None:
    estimate_alpha_beta(model, stream(n, 64), b)


def peak_rss_mb(n: int, b: int) -> float:
    code = (
        "import resource, sys; sys.path.insert(0, 'benchmarks');"
        "import bench_estimate as be, common;"
        f"be.run_estimate(common.resnet_like(), {n}, {b});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resnet_like()
    n, b = args.examples, args.b
    jobs = {
        "estimate": lambda: run_estimate(model, n, b),
        f"train fwd B={b}": lambda: train_forward(model, n, b),
        "train fwd 64": lambda: train_forward(model, n, 64),
    }
    med = interleaved(jobs, args.repeats)
    print(f"machine: {machine()}")
    print(
        f"model: ResNet-style CIFAR net (20 BN layers), {n} examples of 3x32x32, B = {b}, "
        f"{args.repeats} repeats"
    )
    for k, v in med.items():
        print(f"  {k:18s} median {v:7.3f} s")
    ratio_b = med["estimate"] / med[f"train fwd B={b}"]
    print(f"ratio estimate / train-mode forward (batches of B={b}): {ratio_b:.2f}")
    print(
        f"ratio estimate / train-mode forward (batches of 64):   {med['estimate'] / med['train fwd 64']:.2f}"
    )
    one, four = peak_rss_mb(n, b), peak_rss_mb(4 * n, b)
    print(f"peak RSS: {n} examples {one:.0f} MB, {4 * n} examples {four:.0f} MB (ratio {four / one:.3f})")


if __name__ == "__main__":
    main()

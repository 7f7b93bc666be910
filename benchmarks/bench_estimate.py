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
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

from bncorrect.estimate import estimate_alpha_beta


def resnet_like(width: int = 32) -> nn.Module:
    """Small ResNet-style CIFAR net: conv-BN-ReLU stem, 3 stages of 2 residual blocks, BN after each conv."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(h)) + self.short(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


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
        "import bench_estimate as be;"
        f"be.run_estimate(be.resnet_like(), {n}, {b});"
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
    timings: dict[str, list[float]] = {"estimate": [], f"train fwd B={b}": [], "train fwd 64": []}
    jobs = {
        "estimate": lambda: run_estimate(model, n, b),
        f"train fwd B={b}": lambda: train_forward(model, n, b),
        "train fwd 64": lambda: train_forward(model, n, 64),
    }
    for fn in jobs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in jobs.items():
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
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

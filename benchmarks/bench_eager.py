"""PyTorch eager inference: corrected model vs the original, measured side by side.

For a ResNet-style and a MobileNet-style net (BN after every conv), batch 1 and 32, eval mode, no grad:
original BN, corrected with alpha = beta = 0.25 (the rule of thumb for B = 2), and corrected with
alpha = beta = 0 (which falls through to the original layer). Prints median latencies and ratios.

Usage: python benchmarks/bench_eager.py [--repeats 30] [--threads 2] [--size 32]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import interleaved, machine, mobilenet_like, resnet_like

from bncorrect.layers import correct_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; input 3x{args.size}x{args.size}")
    header = ("net", "batch", "original ms", "corrected ms", "ratio", "alpha=0 ratio")
    print("{:10s} {:>5s} {:>12s} {:>13s} {:>6s} {:>14s}".format(*header))
    for name, make in (("resnet", resnet_like), ("mobilenet", mobilenet_like)):
        original = make()
        corrected = correct_model(copy.deepcopy(original), 0.25)
        identity = correct_model(copy.deepcopy(original), 0.0)
        for batch in (1, 32):
            x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
            reps = 5 if args.size <= 32 else 1

            def run(m: torch.nn.Module, x: torch.Tensor = x, reps: int = reps) -> None:
                with torch.no_grad():
                    for _ in range(reps):
                        m(x)

            models = {"orig": original, "corr": corrected, "ident": identity}
            med = interleaved(
                {k: (lambda m=m: run(m)) for k, m in models.items()},
                args.repeats,
                warmup=3,
            )
            o, c, i = (med[k] / reps * 1e3 for k in ("orig", "corr", "ident"))
            print(f"{name:10s} {batch:5d} {o:12.3f} {c:13.3f} {c / o:6.2f} {i / o:14.2f}")


if __name__ == "__main__":
    main()

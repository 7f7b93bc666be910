"""Cost of `estimate` against one training-mode forward pass, and its peak memory at 1x and 4x the data.

Prints ratios measured side by side in one run (runs interleaved, median of repeats):

- estimate / train-mode forward in batches of B (what the issue's speed bar names),
- estimate / train-mode forward in batches of 64 (the forward batch bncorrect itself uses, with
  normalization over ghost groups of B, so the comparison isolates the estimator's own work),
- peak RSS of a process running estimate over N and 4N streamed examples (data generated on the fly, so
  only the estimator's memory can grow).

``--wide`` instead measures a wide net (Conv 3->512 to 7x7, BN(512), Conv 1x1 512->2048, BN(2048): the
shape of a ResNet-50 last stage), running statistics set to the data's (inference-consistent
recalibration), on examples with per-example scale and shift:

- peak RSS of a process running estimate over N and 4N streamed examples, and the numbers each layer's
  reservoir holds (values, statistics, indices) after each,
- the rows and distinct examples each layer keeps, and mean / std / range of each layer's alpha and beta
  over ``--seeds`` estimator seeds on the same N examples (the sampling is all that differs).

Run it with ``PYTHONPATH=<an older checkout>`` from outside the repository to measure that version the
same way ("before" numbers).

Usage: python benchmarks/bench_estimate.py [--examples 2048] [--repeats 5] [--b 2]
       python benchmarks/bench_estimate.py --wide [--examples 1024] [--seeds 5] [--b 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from common import interleaved, machine, resnet_like
from torch import nn

import bncorrect.estimation as estimation
from bncorrect.estimation import estimate_alpha_beta

HERE = Path(__file__).resolve().parent
#: per layer: alpha, beta, rows, examples, positions, stored
Layers = dict[str, dict[str, float]]


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
        f"import resource, sys; sys.path.insert(0, {str(HERE)!r});"
        "import bench_estimate as be, common;"
        f"be.run_estimate(common.resnet_like(), {n}, {b});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def wide_net() -> nn.Module:
    """Conv(3->512, 4x4 stride 4) to 7x7, BN(512), ReLU, Conv(1x1, 512->2048), BN(2048): input 3x28x28."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 512, 4, 4, bias=False),
        nn.BatchNorm2d(512),
        nn.ReLU(),
        nn.Conv2d(512, 2048, 1, bias=False),
        nn.BatchNorm2d(2048),
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def wide_stream(n: int, batch: int = 64, seed: int = 0) -> Iterator[tuple[torch.Tensor]]:
    """Examples whose per-channel means and scales vary from example to example (as real images' do)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        scale = 0.5 + torch.rand(m, 1, 1, 1, generator=g)
        shift = 0.5 * torch.randn(m, 3, 1, 1, generator=g)
        yield (torch.randn(m, 3, 28, 28, generator=g) * scale + shift,)


def calibrated_wide_net(n: int) -> nn.Module:
    """wide_net with every BN's running statistics those of the data (recalibrate --upstream eval)."""
    from bncorrect.recalibration import recalibrate_stats

    model = wide_net()
    batches = list(wide_stream(n))
    stats = recalibrate_stats(model, batches, upstream="eval").stats
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            bn = model.get_submodule(name)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return model


def _stored_numbers(reservoir: object) -> int:
    """Numbers in the tensors a reservoir holds (works for any version of SampleReservoir)."""
    return sum(v.numel() for v in vars(reservoir).values() if isinstance(v, torch.Tensor))


def wide_run(n: int, b: int, seed: int, calibrate_on: int) -> Layers:
    """estimate on the wide net over n streamed examples; per layer what it kept and what it found."""
    model = calibrated_wide_net(calibrate_on)
    stored: dict[str, int] = {}
    solve = estimation.EvalNormEstimator.solve

    def recording_solve(self: estimation.EvalNormEstimator) -> estimation.LayerEstimate:
        stored[self.name] = _stored_numbers(self.reservoir)
        return solve(self)

    estimation.EvalNormEstimator.solve = recording_solve  # type: ignore[method-assign]
    try:
        result = estimate_alpha_beta(model, wide_stream(n), b, seed=seed)
    finally:
        estimation.EvalNormEstimator.solve = solve  # type: ignore[method-assign]
    return {
        ly.name: {
            "alpha": ly.alpha,
            "beta": ly.beta,
            "rows": ly.sampled_rows,
            "examples": getattr(ly, "sampled_examples", ly.sampled_rows),
            "positions": ly.positions,
            "stored": stored[ly.name],
        }
        for ly in result.layers
    }


def wide_subprocess(
    n: int, b: int, seed: int, calibrate_on: int
) -> tuple[float, dict[str, dict[str, float]]]:
    """(peak RSS in MB, wide_run's result) of a fresh process."""
    code = (
        f"import json, resource, sys; sys.path.insert(0, {str(HERE)!r});"
        "import bench_estimate as be, torch; torch.set_num_threads(%d);"
        f"out = be.wide_run({n}, {b}, {seed}, {calibrate_on});"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out]))"
    ) % torch.get_num_threads()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss, layers = json.loads(out.stdout.strip().splitlines()[-1])
    return float(rss), layers


def main_wide(n: int, b: int, seeds: int) -> None:
    print(f"machine: {machine()}; estimation module: {estimation.__file__}")
    print(f"wide net (BN 512 at 7x7, BN 2048 at 7x7), B = {b}, running statistics from {n} examples")
    one, r1 = wide_subprocess(n, b, 0, n)
    four, r4 = wide_subprocess(4 * n, b, 0, n)
    print(f"peak RSS: {n} examples {one:.0f} MB, {4 * n} examples {four:.0f} MB (ratio {four / one:.3f})")
    for name in r1:
        print(
            f"  layer {name}: numbers stored {r1[name]['stored']} vs {r4[name]['stored']}; "
            f"rows kept {r1[name]['rows']} of {r1[name]['positions']} positions, distinct examples "
            f"{r1[name]['examples']} ({n} examples) / {r4[name]['examples']} ({4 * n} examples)"
        )
    runs = [r1] + [wide_subprocess(n, b, s, n)[1] for s in range(1, seeds)]
    print(f"alpha, beta over seeds 0..{seeds - 1} on the same {n} examples:")
    for name in r1:
        for key in ("alpha", "beta"):
            v = [float(r[name][key]) for r in runs]
            print(
                f"  layer {name} {key}: mean {statistics.mean(v):.4f} std {statistics.stdev(v):.4f} "
                f"range {max(v) - min(v):.4f}  ({', '.join(f'{x:.3f}' for x in v)})"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wide", action="store_true", help="memory and seed spread on a wide net")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.wide:
        main_wide(args.examples, args.b, args.seeds)
        return
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
        f"model: ResNet-style CIFAR net (15 BN layers), {n} examples of 3x32x32, B = {b}, "
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

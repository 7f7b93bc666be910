"""Cost of `sweep-alpha` against K single evaluation passes, per evaluation strategy.

The issue's speed bar: a sweep over K alphas takes at most 1.1 x K x one eval pass over the data. Every run
below is measured side by side in one process (cases and strategies interleaved, median of repeats):

- ``plain pass``: one pass over the data (read + decode + forward) with the plain model (native BN);
- ``corrected pass``: the same with every BN layer corrected (alpha = beta = 0.1): what evaluating one
  alpha at a time costs, since the corrected layer computes per-example statistics plain BN does not;
- the sweep (K = 11, the default grid) with each evaluation strategy of :func:`bncorrect.sweep.sweep_alpha`:
  ``sequential`` (data read once, one forward per candidate), ``stacked`` (candidates stacked along the
  batch axis), ``stacked+shared-prefix`` (the first BN layer fans the batch out), ``auto`` (the default:
  times stacked and sequential on the first two batches and keeps the faster).

Printed ratios: sweep / (K x plain pass) and sweep / (K x corrected pass).

Cases: the sample checkpoints (``sample_checkpoints/{digits,mnist1d}_b{2,32}``; random-weight models of
the same architecture when they are missing), and a bigger conv net on 3x32x32 inputs, once from memory
and once from a folder of PNG files (decoded on every pass, so sharing the data read shows).

Usage: python benchmarks/bench_sweep.py [--repeats 3] [--batch-size 256] [--threads N] [--quick]
       [--samples DIR]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bncorrect import sample_models  # noqa: E402
from bncorrect.data import DataSpec, load_data, make_loader  # noqa: E402
from bncorrect.layers import correct_model  # noqa: E402
from bncorrect.sweep import DEFAULT_ALPHAS, sweep_alpha  # noqa: E402

STRATEGIES: dict[str, dict[str, object]] = {
    "sequential": {"stack": False},
    "stacked": {"stack": True, "share_prefix": False},
    "stacked+shared-prefix": {"stack": True, "share_prefix": True},
    "auto": {"stack": "auto"},
}


def conv32(width: int = 32) -> nn.Module:
    """A small VGG-style net for 3x32x32 inputs: 6 conv-BN-ReLU layers, 3 poolings, a linear head."""
    layers: list[nn.Module] = []
    cin = 3
    for i, cout in enumerate((width, width, 2 * width, 2 * width, 4 * width, 4 * width)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return _randomize(nn.Sequential(*layers))


def _randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class Case:
    """A model and a way to iterate the data (a fresh loader per pass, so every pass reads the data)."""

    def __init__(self, name: str, model: nn.Module, batches: Callable[[], Iterable[object]], n: int) -> None:
        self.name = name
        self.model = model.eval()
        self.batches = batches
        self.n = n
        self.corrected = correct_model(copy.deepcopy(model), 0.1).eval()


def _loader_factory(dataset: object, batch_size: int) -> Callable[[], Iterable[object]]:
    return lambda: make_loader(dataset, batch_size)  # type: ignore[arg-type]


def sample_case(name: str, batch_size: int, samples: Path) -> Case:
    folder = samples / name
    if (folder / "model.pt").is_file() and (folder / "val.npz").is_file():
        from bncorrect.models import load_model

        model = load_model(folder / "model.pt").model
        dataset = load_data(folder / "val.npz")
        label = name
    else:  # same architecture, random weights, random data of the samples' size
        factory = sample_models.digits_cnn if name.startswith("digits") else sample_models.mnist1d_cnn
        model = _randomize(factory())
        shape = (1, 8, 8) if name.startswith("digits") else (1, 40)
        n = 500 if name.startswith("digits") else 1000
        g = torch.Generator().manual_seed(1)
        tmp = Path(tempfile.mkdtemp()) / "val.npz"
        np.savez(tmp, x=torch.randn(n, *shape, generator=g).numpy(), y=np.arange(n) % 10)
        dataset = load_data(tmp)
        label = f"{name} (missing: random weights)"
    return Case(label, model, _loader_factory(dataset, batch_size), len(dataset))


def conv_cases(batch_size: int, n: int, png: bool) -> list[Case]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 10
    model = conv32()
    tmp = Path(tempfile.mkdtemp())
    np.savez(tmp / "data.npz", x=x.numpy(), y=y.numpy())
    cases = [
        Case(
            f"conv32 3x32x32, {n} in memory",
            model,
            _loader_factory(load_data(tmp / "data.npz"), batch_size),
            n,
        )
    ]
    if png:
        from PIL import Image

        pixels = (torch.rand(n, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        for i in range(n):
            folder = tmp / "images" / f"class{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(folder / f"{i:05d}.png")
        dataset = load_data(tmp / "images", DataSpec())
        cases.append(Case(f"conv32 3x32x32, {n} PNG files", model, _loader_factory(dataset, batch_size), n))
    return cases


def plain_pass(model: nn.Module, batches: Iterable[object]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(batch[0])  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--conv-examples", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="conv32 in memory only, one repeat")
    parser.add_argument(
        "--samples", type=Path, default=ROOT / "sample_checkpoints", help="sample checkpoints"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    alphas = list(DEFAULT_ALPHAS)
    k = len(alphas)
    if args.quick:
        cases = conv_cases(args.batch_size, args.conv_examples, png=False)
        args.repeats = 1
    else:
        cases = [
            sample_case(n, args.batch_size, args.samples)
            for n in ("digits_b2", "digits_b32", "mnist1d_b2", "mnist1d_b32")
        ]
        cases += conv_cases(args.batch_size, args.conv_examples, png=True)

    runs: dict[str, Callable[[Case], object]] = {
        "plain pass": lambda c: plain_pass(c.model, c.batches()),
        "corrected pass": lambda c: plain_pass(c.corrected, c.batches()),
    }
    for name, kw in STRATEGIES.items():
        runs[name] = lambda c, kw=kw: sweep_alpha(c.model, c.batches(), alphas, **kw)  # type: ignore[arg-type]

    for case in cases:  # warm-up (allocator, mkldnn primitives, page cache)
        plain_pass(case.model, case.batches())
        sweep_alpha(case.model, case.batches(), alphas[:2])
    times: dict[tuple[str, str], list[float]] = {}
    results: dict[tuple[str, str], object] = {}
    for _ in range(args.repeats):
        for case in cases:
            for run_name, fn in runs.items():
                t0 = time.perf_counter()
                out = fn(case)
                times.setdefault((case.name, run_name), []).append(time.perf_counter() - t0)
                results[(case.name, run_name)] = out

    print(
        f"sweep-alpha benchmark: K = {k} alphas, batch size {args.batch_size}, {args.repeats} repeats "
        f"(median), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {datetime.date.today()}"
    )
    for case in cases:
        med = {r: statistics.median(times[(case.name, r)]) for r in runs}
        plain, corr = med["plain pass"], med["corrected pass"]
        print(f"\n{case.name} ({case.n} examples)")
        print(f"  plain pass      {1e3 * plain:9.1f} ms")
        print(f"  corrected pass  {1e3 * corr:9.1f} ms   ({corr / plain:.2f} x plain)")
        nll_ref = None
        for name in STRATEGIES:
            res = results[(case.name, name)]
            nlls = [r.nll for r in res.rows]  # type: ignore[attr-defined]
            nll_ref = nlls if nll_ref is None else nll_ref
            diff = max(abs(a - b) for a, b in zip(nlls, nll_ref, strict=True))
            print(
                f"  {name:22s} {1e3 * med[name]:9.1f} ms   / (K x plain) = {med[name] / (k * plain):.3f}"
                f"   / (K x corrected) = {med[name] / (k * corr):.3f}   used: {res.strategy}"  # type: ignore[attr-defined]
                f"   max |nll - sequential| = {diff:.1e}"
            )


if __name__ == "__main__":
    main()

"""PyTorch deployment under ``torch.compile``: the corrected model vs the original, eager and compiled with
inductor on CPU, measured side by side (issue #15, part 4).

For a ResNet-style and a MobileNet-style net (``benchmarks/common.py``, BN after every conv, input
3 x size x size), eval mode, no grad: the original and the model corrected with alpha = beta (every
layer), each eager and ``torch.compile(backend="inductor")``. Runs are interleaved (rotating order), and
the table gives the median of the per-round ratios. It also reads the code inductor generates for one
corrected layer (``torch._inductor.utils.run_and_get_code``) and reports how many kernels it needs and
whether the per-example statistics and the affine step share one kernel.

Usage: python benchmarks/bench_compile.py [--repeats 15] [--threads 2] [--size 32] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_onnx_inference import host
from common import mobilenet_like, resnet_like

from bncorrect.layers import correct_model


def kernels(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[str]:
    """Names of the C++ kernels inductor generates for ``fn`` (compiled on the spot)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(fn, backend="inductor"), x)
    return sorted(set(re.findall(r"(cpp_fused_\w+)\s*=", "\n".join(code))))


def layer_report(alpha: float, channels: int = 64, size: int = 16, batch: int = 8) -> dict[str, object]:
    """Kernels of one BatchNorm2d layer, plain and corrected."""
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    corrected = correct_model(nn.Sequential(copy.deepcopy(bn)), alpha).eval()
    x = torch.randn(batch, channels, size, size)
    with torch.no_grad():
        plain_k = kernels(bn, x)
        corr_k = kernels(corrected, x)
    return {"plain": plain_k, "corrected": corr_k}


def bench(jobs: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, list[float]]:
    for fn in jobs.values():  # warm up (compiles)
        for _ in range(3):
            fn()
    keys = list(jobs)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(repeats):
        for k in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            t = time.perf_counter()
            for _ in range(inner):
                jobs[k]()
            times[k].append((time.perf_counter() - t) / inner)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--nets", default="resnet,mobilenet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# host: {host()}  torch {torch.__version__}  threads={args.threads}  "
        f"input 3x{args.size}x{args.size}"
        f"  alpha=beta={args.alpha}  rounds={args.repeats}  load average "
        + " ".join(f"{v:.1f}" for v in os.getloadavg()),
        flush=True,
    )
    rep = layer_report(args.alpha)
    print(f"inductor kernels, one BatchNorm2d(64) on (8, 64, 16, 16): plain {rep['plain']}")
    print(f"  corrected: {rep['corrected']}", flush=True)
    nets = {"resnet": ("ResNet-style", resnet_like), "mobilenet": ("MobileNet-style", mobilenet_like)}
    rows = []
    for key in args.nets.split(","):
        label, make = nets[key]
        original = make().eval()
        corrected = correct_model(copy.deepcopy(original), args.alpha).eval()
        torch._dynamo.reset()
        models = {
            "original": original,
            "corrected": corrected,
            "original compiled": torch.compile(original, backend="inductor"),
            "corrected compiled": torch.compile(corrected, backend="inductor"),
        }
        for n in (int(v) for v in args.batches.split(",")):
            x = torch.randn(n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = original(x)
                for k, m in models.items():  # the compiled models compute what the eager ones do
                    out = m(x)
                    assert out.shape == ref.shape, k
                cc = (models["corrected compiled"](x) - corrected(x)).abs().max().item()
                oc = (models["original compiled"](x) - ref).abs().max().item()

            def job(m: nn.Module, x: torch.Tensor = x) -> Callable[[], object]:
                def run() -> object:
                    with torch.no_grad():
                        return m(x)

                return run

            inner = 10 if n == 1 else 1
            t = bench({k: job(m) for k, m in models.items()}, args.repeats, inner)

            def ratio(a: str, b: str, t: dict[str, list[float]] = t) -> float:
                return statistics.median(p / q for p, q in zip(t[a], t[b], strict=True))

            rows.append(
                (
                    label,
                    n,
                    statistics.median(t["original"]) * 1e3,
                    ratio("corrected", "original"),
                    statistics.median(t["original compiled"]) * 1e3,
                    ratio("corrected compiled", "original compiled"),
                    ratio("original compiled", "original"),
                    ratio("corrected compiled", "corrected"),
                    max(cc, oc),
                )
            )
            print(f"  {label} batch {n}: {rows[-1]}", flush=True)
    print()
    print(
        "| net | batch | eager original ms | eager corrected / original | compiled original ms "
        "| compiled corrected / compiled original | compiled / eager (original) | compiled / eager "
        "(corrected) | max abs diff compiled vs eager |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, n, eo, er, co, cr, ro, rc, diff in rows:
        print(
            f"| {label} | {n} | {eo:.2f} | {er:.3f} | {co:.2f} | **{cr:.3f}** | {ro:.3f} | {rc:.3f} "
            f"| {diff:.1e} |"
        )


if __name__ == "__main__":
    main()

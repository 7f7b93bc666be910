"""`recalibrate` against a direct PreciseBN-style loop (fvcore's update_bn_stats), and the two
inference-consistent schemes against each other on a deep net.

1. Training-consistent statistics (`--upstream train`) over the same batches as fvcore's update_bn_stats on
   the ResNet-style net of common.py: the script checks they agree and prints the time ratio, with the
   inference-consistent default (`--upstream eval`) alongside.
2. The rejected plain fixed-point iteration against the iterative scheme's per-batch offsets on a chain of
   20 Conv-BN-ReLU layers: the difference to the exact statistics after each pass.
3. `--upstream eval` on a DenseNet-121-style net built here (121 BN layers, each depending on all before
   it): the exact layer-by-layer scheme (`--exact`, one partial pass per layer) against the iterative
   default (full passes until the largest relative change is within the tolerance), side by side, with the
   passes it took, its last change and the largest difference of the statistics. With `--onnx` the same on
   the net's ONNX export in onnxruntime.

Usage: python benchmarks/bench_recalibrate.py [--examples 1024] [--b 8] [--repeats 3]
       [--deep-examples 192] [--deep-batches 64,192] [--deep-size 16] [--deep-repeats 1] [--onnx]
       [--parts fvcore,fixed-point,deep]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from common import interleaved, machine, resnet_like
from torch import nn

from bncorrect.recalibration import RecalibrateResult, recalibrate_stats


# ------------------------------------------------------------------------------------------- the deep net
class DenseLayer(nn.Module):
    """DenseNet's bottleneck layer: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 on the concatenation of earlier maps."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(torch.relu(self.norm1(torch.cat(feats, 1))))
        return self.conv2(torch.relu(self.norm2(h)))


class DenseBlock(nn.Module):
    def __init__(self, n: int, cin: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + k * growth, growth) for k in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class DenseNet(nn.Module):
    """torchvision's densenet121 layout (blocks of 6, 12, 24, 16 layers, transitions halving channels
    and maps, 121 BN layers) at a small width (growth 12, 24 stem channels, a 3x3 stem without pooling)."""

    def __init__(self, blocks: tuple[int, ...] = (6, 12, 24, 16), growth: int = 12, init: int = 24) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, init, 3, padding=1, bias=False),
            nn.BatchNorm2d(init),
            nn.ReLU(),
        ]
        c = init
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth))
            c += n * growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def densenet_like(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = DenseNet()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return net.eval()


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Images with spatial structure (upsampled noise plus pixel noise), not white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(1, size // 4), max(1, size // 4), generator=g)
    up = nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return up + 0.3 * torch.randn(n, 3, size, size, generator=g)


def relative_difference(
    got: dict[str, tuple[torch.Tensor, torch.Tensor]], want: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, float]:
    """(largest |mean difference| / sqrt(var + eps) or |var difference| / (var + eps), largest absolute)."""
    rel = absolute = 0.0
    for name, (mean, var) in want.items():
        scale = var.double() + 1e-5
        dm = (got[name][0].double() - mean.double()).abs()
        dv = (got[name][1].double() - var.double()).abs()
        rel = max(rel, float((dm / scale.sqrt()).max()), float((dv / scale).max()))
        absolute = max(absolute, float(dm.max()), float(dv.max()))
    return rel, absolute


def timed(fn: Callable[[], RecalibrateResult]) -> tuple[float, RecalibrateResult]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def bench_deep(args: argparse.Namespace) -> None:
    model = densenet_like()
    n = args.deep_examples
    x = smooth_images(n, args.deep_size, seed=1)
    sizes = [int(b) for b in args.deep_batches.split(",")]
    batchings = {b: [(x[i : i + b],) for i in range(0, n, b)] for b in sizes}
    layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    print(
        f"\nDenseNet-121-style net, {layers} BN layers (depth {layers - 1}), {n} examples of "
        f"3x{args.deep_size}x{args.deep_size}, --upstream eval, {args.deep_repeats} round(s) of every run "
        "interleaved, medians"
    )
    runtimes: dict[str, Callable[..., RecalibrateResult]] = {
        "PyTorch": lambda batches, **kw: recalibrate_stats(model, batches, **kw)
    }
    names = None
    if args.onnx:
        from bncorrect.onnx_export import _export_legacy
        from bncorrect.onnx_passes import recalibrate_onnx
        from bncorrect.onnx_rewrite import match_layers

        proto = _export_legacy(model, (x[:2],), 17, True)
        names = match_layers(proto, [k for k, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)])
        runtimes["onnxruntime"] = lambda batches, **kw: recalibrate_onnx(
            proto, batches, device="cpu", threads=args.threads, **kw
        )
    exact_batch = sizes[0]
    jobs: dict[tuple[str, str, int], Callable[[], RecalibrateResult]] = {}
    for runtime, run in runtimes.items():
        jobs[(runtime, "exact", exact_batch)] = lambda run=run: run(batchings[exact_batch], exact=True)
        for b in sizes:
            jobs[(runtime, "iterative", b)] = lambda run=run, b=b: run(batchings[b])
    times: dict[tuple[str, str, int], list[float]] = {k: [] for k in jobs}
    results: dict[tuple[str, str, int], RecalibrateResult] = {}
    for _ in range(args.deep_repeats):
        for key, fn in jobs.items():
            dt, results[key] = timed(fn)
            times[key].append(dt)
    if names is not None:
        for key, result in results.items():
            if key[0] == "onnxruntime":
                result.stats = {k: result.stats[node] for k, node in names.items()}
    reference = results[("PyTorch", "exact", exact_batch)].stats
    print(
        "| runtime | scheme | batch | passes | last change | seconds | / exact | max difference (relative) |"
        " (absolute) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for runtime in runtimes:
        exact_time = statistics.median(times[(runtime, "exact", exact_batch)])
        exact = results[(runtime, "exact", exact_batch)]
        rel, absolute = relative_difference(exact.stats, reference)
        print(
            f"| {runtime} | layer by layer (`--exact`) | {exact_batch} | {exact.passes} partial | - | "
            f"{exact_time:.1f} | 1 | {rel:.1e} | {absolute:.1e} |"
        )
        for b in sizes:
            result = results[(runtime, "iterative", b)]
            t = statistics.median(times[(runtime, "iterative", b)])
            rel, absolute = relative_difference(result.stats, exact.stats)
            change = "-" if result.max_change is None else f"{result.max_change:.1e}"
            print(
                f"| {runtime} | iterative (default) | {b} | {result.passes} | {change} | {t:.1f} | "
                f"**{t / exact_time:.3f}** | {rel:.1e} | {absolute:.1e} |"
            )
            print(
                f"|  |  |  | changes: {' '.join(f'{c:.1e}' for c in result.changes or [])} |  |  |  |  |  |"
            )
    print(
        "max difference: iterative against the same runtime's exact scheme (the exact rows: against "
        "PyTorch's); relative: |mean| / sqrt(var + eps), |var| / (var + eps)"
    )


def chain(n: int = 20, c: int = 8, seed: int = 0) -> nn.Module:
    """n Conv-BN-ReLU layers in a plain chain, 8 channels."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
    for _ in range(n):
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False)]
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return net.eval()


def plain_fixed_point(
    model: nn.Module, batches: list[tuple[torch.Tensor]], passes: int
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The rejected scheme: pass 1 with each batch's own statistics (as the iterative scheme), then every
    pass normalizes every layer with the previous pass's population statistics S and gathers new ones."""
    from bncorrect.layers import correct_model, corrected_layers
    from bncorrect.recalibration import PopulationMoments

    work = correct_model(copy.deepcopy(model), 0.0).eval()
    layers = corrected_layers(work)
    out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for t in range(passes):
        moments = {k: PopulationMoments(m.num_channels) for k, m in layers.items()}

        def hook(
            m: nn.Module, i: tuple[torch.Tensor, ...], k: str, t: int = t, moments: dict = moments
        ) -> None:
            mean, var = moments[k].add(i[0])
            if t == 0:
                m.norm.running_mean.copy_(mean)  # type: ignore[union-attr, operator]
                m.norm.running_var.copy_(var)  # type: ignore[union-attr, operator]

        handles = [m.register_forward_pre_hook(lambda m, i, k=k: hook(m, i, k)) for k, m in layers.items()]
        with torch.no_grad():
            for (xb,) in batches:
                work(xb)
        for h in handles:
            h.remove()
        out.append({k: (pm.mean, pm.variance()) for k, pm in moments.items()})
        with torch.no_grad():
            for k, m in layers.items():
                m.norm.running_mean.copy_(out[-1][k][0])
                m.norm.running_var.copy_(out[-1][k][1])
    return out


def bench_fixed_point(args: argparse.Namespace) -> None:
    model = chain()
    x = smooth_images(256, 32, seed=2)
    batches = [(x[i : i + 128],) for i in range(0, 256, 128)]
    exact = recalibrate_stats(model, batches, exact=True).stats
    plain = [relative_difference(s, exact)[0] for s in plain_fixed_point(model, batches, 8)]
    ours = [
        relative_difference(recalibrate_stats(model, batches, tolerance=1e-12, max_passes=k).stats, exact)[0]
        for k in range(2, 9)
    ]
    print("\n20 Conv-BN-ReLU layers in a chain, 256 examples of 3x32x32 in batches of 128: relative")
    print("difference to the exact statistics after pass 1, 2, ...")
    print(f"  plain fixed point (S of the previous pass): {' '.join(f'{e:.1e}' for e in plain)}")
    print(
        f"  per-batch offsets (the iterative scheme):   {plain[0]:.1e} {' '.join(f'{e:.1e}' for e in ours)}"
    )


def bench_fvcore(args: argparse.Namespace) -> None:
    from fvcore.nn.precise_bn import update_bn_stats

    model = resnet_like()
    x = torch.randn(args.examples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b = args.b
    fv_batches = [x[i : i + b] for i in range(0, args.examples, b)]
    our_batches = [(x[i : i + 64],) for i in range(0, args.examples, 64)]
    result: dict[str, object] = {}

    def fvcore_run() -> None:
        m = copy.deepcopy(model).train()
        update_bn_stats(m, fv_batches, num_iters=len(fv_batches))
        result["fvcore"] = m

    def ours_train() -> None:
        result["ours"] = recalibrate_stats(model, our_batches, upstream="train", batch_size=b)

    def ours_eval() -> None:
        result["passes"] = recalibrate_stats(model, our_batches, upstream="eval").passes

    def ours_exact() -> None:
        recalibrate_stats(model, our_batches, upstream="eval", exact=True)

    runs = {"fvcore": fvcore_run, "train": ours_train, "eval": ours_eval, "exact": ours_exact}
    med = interleaved(runs, args.repeats)
    ref = result["fvcore"]
    ours = result["ours"]
    worst = 0.0
    for name, (mean, var) in ours.stats.items():  # type: ignore[attr-defined]
        bn = ref.get_submodule(name)  # type: ignore[attr-defined]
        worst = max(
            worst, float((mean - bn.running_mean).abs().max()), float((var - bn.running_var).abs().max())
        )
    print(
        f"ResNet-style net, 15 BN layers, {args.examples} examples of 3x32x32, B = {b}, {args.repeats} reps"
    )
    print(f"  fvcore update_bn_stats (batches of B)     {med['fvcore']:7.3f} s")
    labels = {
        "train": "--upstream train",
        "eval": f"--upstream eval --iterative ({result['passes']} passes)",
        "exact": "--upstream eval --exact (layer by layer)",
    }
    for key, label in labels.items():
        ratio = med[key] / med["fvcore"]
        print(f"  bncorrect recalibrate {label:44s} {med[key]:7.3f} s   ratio {ratio:.2f}")
    print(f"  max |difference| of the statistics, train mode vs fvcore: {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deep-examples", type=int, default=192)
    parser.add_argument("--deep-batches", default="64,192", help="batch sizes for the iterative scheme")
    parser.add_argument("--deep-size", type=int, default=16)
    parser.add_argument("--deep-repeats", type=int, default=1)
    parser.add_argument("--onnx", action="store_true", help="also the deep net's ONNX export in onnxruntime")
    parser.add_argument("--parts", default="fvcore,fixed-point,deep", help="which parts to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    parts = set(args.parts.split(","))
    if "fvcore" in parts:
        bench_fvcore(args)
    if "fixed-point" in parts:
        bench_fixed_point(args)
    if "deep" in parts:
        bench_deep(args)


if __name__ == "__main__":
    main()

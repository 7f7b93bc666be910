"""The GPU path measured: estimate, recalibrate, sweep-alpha and tune on ``--device`` against the CPU.

Run by ``scripts/gpu_check.sh`` (which bounds it in time). Two parts:

1. the sample checkpoints (``sample_checkpoints/*_b2``): every command on ``--device`` and on the CPU,
   results compared (recalibrated statistics, alpha/beta, the sweep's rows and best alpha, tune's choice);
2. a ResNet-50-sized random net (bottleneck blocks 3-4-6-3, 53 BN layers, 23.7 M parameters with 100
   classes) on ``--images`` synthetic images of ``--size`` pixels: images/s of estimate, recalibrate
   (both upstream modes), sweep-alpha and a plain eval pass on ``--device``, the sweep's speed ratio (its
   time over K plain eval passes, K candidates), and the same commands on the CPU on the first
   ``--check-images`` images, compared with the device's results on those images.

Every check prints PASS/FAIL; the exit status is the number of failures (0: all passed). ``--device cpu
--tiny`` runs everything on the CPU with tiny sizes: the script's own smoke test (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bncorrect import api  # noqa: E402

FAILURES: list[str] = []


def check(ok: bool, what: str, detail: str = "") -> None:
    print(f"  {'PASS' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(what)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Any) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).abs() / (b.abs() + 1e-6)).max())


def stats_of(outcome: api.Outcome) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (c.running_mean, c.running_var) for n, c in outcome.corrections.layers.items()}


def coeffs_of(outcome: api.Outcome) -> dict[str, tuple[float, float]]:
    return {n: (float(c.alpha.mean()), float(c.beta.mean())) for n, c in outcome.corrections.layers.items()}


def compare_stats(label: str, got: dict, want: dict, tol: float) -> None:
    worst = max(max(max_rel(got[n][0], want[n][0]), max_rel(got[n][1], want[n][1])) for n in want)
    check(
        set(got) == set(want) and worst <= tol,
        f"{label}: statistics match the CPU",
        f"max rel diff {worst:.2e}",
    )


def compare_coeffs(label: str, got: dict, want: dict, tol: float) -> None:
    worst = max(max(abs(got[n][0] - want[n][0]), abs(got[n][1] - want[n][1])) for n in want)
    check(
        set(got) == set(want) and worst <= tol,
        f"{label}: alpha/beta match the CPU",
        f"max abs diff {worst:.2e}",
    )


def compare_sweep(label: str, got: dict, want: dict, tol: float) -> None:
    rows = zip(got["rows"], want["rows"], strict=True)
    worst = max(abs(a["nll"] - b["nll"]) / max(abs(b["nll"]), 1e-9) for a, b in rows)
    check(worst <= tol, f"{label}: sweep rows match the CPU", f"max rel nll diff {worst:.2e}")
    same = math.isclose(got["best"]["alpha"], want["best"]["alpha"]) or (
        abs(got["best"]["nll"] - want["best"]["nll"]) <= tol * abs(want["best"]["nll"])
    )
    check(same, f"{label}: the same best alpha", f"{got['best']['alpha']} vs {want['best']['alpha']}")


# ------------------------------------------------------------------------------------------- the samples
def samples(device: str, tiny: bool) -> None:
    for name in ("digits_b2", "mnist1d_b2"):
        folder = ROOT / "sample_checkpoints" / name
        model, data = folder / "model.pt", folder / "val.npz"
        b = json.loads((folder / "model_card.json").read_text())["train_batch_size"]
        limit = 96 if tiny else None
        print(f"samples: {name} (B = {b}) on {device} and cpu", flush=True)
        res = {}
        for dev in dict.fromkeys((device, "cpu")):
            kw = {"device": dev, "max_examples": limit}
            r = {
                "estimate": coeffs_of(api.estimate(model, data, b, seed=0, **kw)),
                "recal_eval": stats_of(api.recalibrate(model, data, **kw)),
                "recal_train": stats_of(api.recalibrate(model, data, upstream="train", batch_size=b, **kw)),
                "sweep": api.sweep_alpha(model, data, train_batch_size=b, **kw).report["sweep"].as_report(),
            }
            tune = api.tune(model, data, b, seed=0, max_epochs=3 if tiny else 20, **kw).report["tune"]
            r["tune"] = (tune.chosen.kind, tune.chosen.value("nll"))
            res[dev] = r
        got, want = res[device], res["cpu"]
        compare_coeffs(f"{name} estimate", got["estimate"], want["estimate"], 0.02)
        compare_stats(f"{name} recalibrate eval", got["recal_eval"], want["recal_eval"], 1e-3)
        compare_stats(f"{name} recalibrate train", got["recal_train"], want["recal_train"], 1e-3)
        compare_sweep(f"{name} sweep-alpha", got["sweep"], want["sweep"], 1e-3)
        check(
            got["tune"][0] == want["tune"][0]
            or abs(got["tune"][1] - want["tune"][1]) <= 2e-3 * abs(want["tune"][1]),
            f"{name} tune: the same choice as the CPU",
            f"{got['tune']} vs {want['tune']}",
        )


# -------------------------------------------------------------------------------------- ResNet-50-sized
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.relu(self.bn3(self.conv3(h)) + self.down(x))


def resnet50(classes: int = 100, tiny: bool = False) -> nn.Module:
    """ResNet-50's layout (torchvision's resnet50 without its weights), random weights and statistics;
    ``tiny``: the same layout at 1/16 of the width, one block a stage."""
    widths, blocks = ((4, 8, 16, 32), (1, 1, 1, 1)) if tiny else ((64, 128, 256, 512), (3, 4, 6, 3))
    stem = widths[0]
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ]  # fmt: skip
    cin = stem
    for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
        for j in range(n):
            layers.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1))
            cin = 4 * w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def plain_pass(model: nn.Module, x: torch.Tensor, device: str, batch: int = 128) -> None:
    net = model.to(device).eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            net(x[i : i + batch].to(device, non_blocking=True))


def big(device: str, images: int, size: int, check_images: int, tiny: bool) -> None:
    model = resnet50(tiny=tiny)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(images, 3, size, size, generator=g)
    y = torch.randint(0, 100, (images,), generator=g)
    if device.startswith("cuda"):
        x = x.pin_memory()
    alphas = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3]
    print(
        f"ResNet-50 layout: {params:.1f} M parameters, {n_bn} BN layers; {images} images of 3x{size}x{size}",
        flush=True,
    )
    rates: dict[str, float] = {}
    _, t_plain = timed(device, lambda: plain_pass(model, x, device))
    rates["plain eval pass"] = images / t_plain
    _, t = timed(device, lambda: api.estimate(model, (x, y), 8, device=device, seed=0))
    rates["estimate (B = 8)"] = images / t
    rec_e, t = timed(device, lambda: api.recalibrate(model, (x, y), device=device))
    passes = rec_e.report["recalibrate"].passes
    rates[f"recalibrate eval ({passes} passes)"] = images / t
    _, t = timed(
        device, lambda: api.recalibrate(model, (x, y), upstream="train", batch_size=8, device=device)
    )
    rates["recalibrate train (B = 8)"] = images / t
    sw, t_sweep = timed(device, lambda: api.sweep_alpha(model, (x, y), alphas=alphas, device=device))
    k = len(sw.report["sweep"].rows)
    rates[f"sweep-alpha ({k} candidates)"] = images / t_sweep
    for label, rate in rates.items():
        print(f"  {label:32s} {rate:9.1f} images/s", flush=True)
    print(
        f"  sweep speed ratio: sweep time / ({k} plain eval passes) = {t_sweep / (k * t_plain):.2f} "
        f"(strategy: {sw.report['sweep'].strategy})",
        flush=True,
    )
    if device == "cpu" and not tiny:
        return
    # the CPU on the first check_images images, against the device on the same images
    m = min(check_images, images)
    xs, ys = x[:m].clone(), y[:m].clone()
    print(f"ResNet-50 layout: {device} against cpu on {m} images", flush=True)
    res = {}
    for dev in dict.fromkeys((device, "cpu")):
        res[dev] = {
            "estimate": coeffs_of(api.estimate(model, (xs, ys), 8, device=dev, seed=0)),
            "recal_train": stats_of(
                api.recalibrate(model, (xs, ys), upstream="train", batch_size=8, device=dev)
            ),
            "sweep": api.sweep_alpha(model, (xs, ys), alphas=alphas, device=dev).report["sweep"].as_report(),
        }
    got, want = res[device], res["cpu"]
    compare_coeffs("resnet50 estimate", got["estimate"], want["estimate"], 0.02)
    compare_stats("resnet50 recalibrate train", got["recal_train"], want["recal_train"], 1e-3)
    compare_sweep("resnet50 sweep-alpha", got["sweep"], want["sweep"], 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--check-images", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the script's smoke test)")
    parser.add_argument("--skip-samples", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.size, args.check_images = min(args.images, 48), min(args.size, 32), 16
    dev = args.device
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            print("CUDA is not available here: run with --device cpu --tiny for the smoke test")
            return 2
        name = torch.cuda.get_device_name()
        print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
        torch.backends.cudnn.benchmark = True
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    np.random.seed(0)
    if not args.skip_samples:
        samples(dev, args.tiny)
    big(dev, args.images, args.size, args.check_images, args.tiny)
    print(f"{len(FAILURES)} checks failed" + (f": {', '.join(FAILURES)}" if FAILURES else ""), flush=True)
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())

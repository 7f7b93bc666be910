"""Throughput of ``estimate`` on a folder of PNG images against a plain PyTorch eval loop over it.

A temporary folder of N small PNGs in class folders is written once; then, interleaved, in one run:

- ``estimate (folder)``: ``api.estimate(model, folder, B)`` (decode, training-mode pass in groups of B
  with the estimator's observers, then the solve), ``num_workers`` DataLoader workers; its pass alone is
  timed too (from the call to the pass's last progress report: loading, model copy, pass; no solve);
- ``estimate (tensors)``: the same on the same images decoded beforehand (a tensor ``(x, y)``): what
  estimate costs without any loading, so folder / tensors is the share of loading;
- ``plain eval loop``: what a PyTorch user writes to evaluate the same folder: an ImageFolder-style
  Dataset (PIL decode, RGB, to tensor, ImageNet mean/std), a DataLoader with the same workers and batch
  size, ``model(x)`` under ``torch.no_grad()`` in eval mode;
- ``decode only``: the plain loop's DataLoader without the model (how much of the time is decoding).

Printed: images/s of each, the ratio of estimate's pass to the plain loop (the issue's goal: >= 0.8) and
of estimate on the folder to estimate on tensors (1.0: loading costs nothing). Every number is from the
same run, the jobs alternating; the host is named.

    python benchmarks/bench_loading.py [--images 384] [--size 64] [--workers 0 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, resnet_like

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def host() -> str:
    """CPU model, vector extensions, cores and torch threads."""
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    ext = [e for e in ("avx2", "avx512f") if f" {e}" in flags]
    return (
        f"{model} ({', '.join(ext) or 'no AVX2'}), {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}"
    )


def make_folder(root: Path, n: int, size: int, classes: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        # smooth images (PNG compresses them as real photos would not, but decoding is still per pixel)
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
        img.save(d / f"{i:05d}.png")
    return root


class PlainImageFolder(Dataset):
    """The ImageFolder a user writes: sorted class folders, PIL decode, to tensor, mean/std."""

    def __init__(self, root: Path) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).glob("*.png"))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(((arr - MEAN) / STD).transpose(2, 0, 1).copy())
        return x, label


def plain_loop(model: torch.nn.Module, root: Path, batch: int, workers: int, forward: bool = True) -> None:
    loader = DataLoader(PlainImageFolder(root), batch_size=batch, shuffle=True, num_workers=workers)
    model.eval()
    with torch.no_grad():
        for x, _ in loader:
            if forward:
                model(x)


PASS_SECONDS: list[float] = []  # estimate (folder): seconds from the call to the pass's last report


def run_estimate(model: torch.nn.Module, data: object, b: int, workers: int, record: bool = False) -> None:
    import time

    from bncorrect import api

    start = time.perf_counter()
    last = [start]

    def progress(_label: str, _done: int, _total: int | None) -> None:
        last[0] = time.perf_counter()

    api.estimate(model, data, b, device="cpu", num_workers=workers, progress=progress)
    if record:
        PASS_SECONDS.append(last[0] - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resnet_like()
    batch = args.b * max(1, 64 // args.b)  # the batches estimate reads
    print(f"host: {host()}")
    print(
        f"data: {args.images} PNG images of {args.size}x{args.size} in 4 class folders; model: "
        f"ResNet-style CIFAR net (20 BN layers); estimate B = {args.b}, loader batches of {batch}; "
        f"{args.repeats} repeats, interleaved"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "images", args.images, args.size)
        from bncorrect.data import load_data

        ds = load_data(root)
        tensors = (
            torch.stack([ds[i][0] for i in range(len(ds))]),
            torch.tensor([ds[i][1] for i in range(len(ds))]),
        )
        head = ("workers", "estimate img/s", "its pass img/s", "on tensors img/s", "plain loop img/s",
                "decode only img/s", "pass/plain", "folder/tensors")  # fmt: skip
        print("  ".join(head))
        for w in args.workers:
            PASS_SECONDS.clear()
            jobs = {
                "estimate": lambda w=w: run_estimate(model, root, args.b, w, record=True),
                "tensors": lambda: run_estimate(model, tensors, args.b, 0),
                "plain": lambda w=w: plain_loop(model, root, batch, w),
                "decode": lambda w=w: plain_loop(model, root, batch, w, forward=False),
            }
            med = interleaved(jobs, args.repeats)
            rate = {k: args.images / v for k, v in med.items()}
            rate["pass"] = args.images / statistics.median(PASS_SECONDS[-args.repeats :])
            cells = (w, rate["estimate"], rate["pass"], rate["tensors"], rate["plain"], rate["decode"],
                     rate["pass"] / rate["plain"], rate["estimate"] / rate["tensors"])  # fmt: skip
            print(
                "  ".join(
                    f"{c:>{len(h)}.{0 if i < 6 else 2}f}"
                    for i, (c, h) in enumerate(zip(cells, head, strict=True))
                )
            )


if __name__ == "__main__":
    main()

"""Throughput of ``estimate`` on a folder of PNG images against a plain PyTorch eval loop over it.

A temporary folder of N small PNGs in class folders is written once. Every job then runs in one of three
long-lived worker processes (four with ``--before``), the jobs alternating round by round (after a warm-up
round) in one run:

- ``estimate``: ``api.estimate(model, folder, B)`` end to end (decode, model copy, training-mode pass in
  groups of B with the estimator's observers, the solve), ``num_workers`` DataLoader workers, in a worker
  set up as the ``bncorrect`` command sets up its process (:func:`bncorrect.allocator.retain_freed_memory`:
  glibc's malloc keeps freed blocks for reuse): what ``bncorrect estimate`` runs. Its pass alone is timed
  too (from the call to the pass's last progress report: no solve);
- ``library``: the same call in a worker with glibc's malloc as it comes, as from a user's own script that
  does not call ``retain_freed_memory``;
- ``estimate (before)``, with ``--before CHECKOUT``: the same call in a worker whose ``PYTHONPATH`` is an
  older checkout of bncorrect (e.g. ``git worktree add --detach /tmp/base <commit>``), with malloc as it
  comes (as the command ran before it set the allocator up), so old and new code are measured side by side
  on the same folder in the same run;
- ``plain loop``: what a PyTorch user writes to evaluate the same folder: an ImageFolder-style Dataset
  (PIL decode, RGB, to tensor, ImageNet mean/std), a DataLoader with the same workers and batch size,
  ``model(x)`` under ``torch.no_grad()`` in eval mode, in a process as Python starts it (the baseline of
  the goal); ``plain-cli``: the same loop in the worker set up like the command, so that the ratio on the
  same allocator is printed too;
- ``ghost-BN loop``: the same loop with every BN in training-mode normalization over groups of B examples
  (``F.batch_norm(part, None, None, weight, bias, training=True)`` on each group of B of the batch, no
  running statistics touched, no estimator): what normalizing like training costs by itself, the bound
  for a pass that must normalize like training;
- ``grouped loop``: the same loop with bncorrect's own training-mode normalization over groups of B (every
  BN wrapped by ``bncorrect.layers.correct_model`` and put in ``normalization_mode(model, "batch", B)``:
  per-example statistics, group statistics from them, one fused affine pass; no observer): estimate's pass
  without the estimator, so estimate / grouped is what the estimator's observers cost;
- ``decode only``: the plain loop's DataLoader without the model.

Printed: images/s of each (wall clock, medians), the ratios to the plain loop (the issue's goal: estimate
>= 0.8x), and with ``--workers 0`` (everything in the worker process) the same ratios in CPU time of that
process, which a loaded host disturbs much less than wall time. The host (CPU model, AVX2/AVX-512F) and the
load average are printed.

    python benchmarks/bench_loading.py [--images 2048] [--size 32] [--workers 0 2] [--repeats 3]
        [--threads 1] [--before /tmp/base]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import resnet_like

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
HERE = Path(__file__).resolve().parent


def host() -> str:
    """CPU model and vector extensions, cores."""
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
    return f"{model} ({', '.join(ext) or 'no AVX2'}), {os.cpu_count()} cores, torch {torch.__version__}"


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


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


class GhostBatchNorm(torch.nn.Module):
    """A BN layer normalizing like training over consecutive groups of ``b`` examples, leaving its running
    statistics alone: plain PyTorch, one ``F.batch_norm`` per group."""

    def __init__(self, bn: torch.nn.BatchNorm2d, b: int) -> None:
        super().__init__()
        self.bn, self.b = bn, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        parts = [
            torch.nn.functional.batch_norm(p, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
            for p in x.split(self.b)
        ]
        return torch.cat(parts)


def ghost_model(model: torch.nn.Module, b: int) -> torch.nn.Module:
    import copy

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, GhostBatchNorm(m, b))
    return out


def grouped_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    from bncorrect.layers import correct_model

    return correct_model(copy.deepcopy(model), 0.0)


def plain_loop(
    model: torch.nn.Module,
    root: Path,
    batch: int,
    workers: int,
    forward: bool = True,
    eval_mode: bool = True,
) -> None:
    loader = DataLoader(PlainImageFolder(root), batch_size=batch, shuffle=True, num_workers=workers)
    if eval_mode:
        model.eval()
    with torch.no_grad():
        for x, _ in loader:
            if forward:
                model(x)


def run_estimate(model: torch.nn.Module, root: Path, b: int, workers: int) -> dict[str, float]:
    """api.estimate on the folder: wall and CPU seconds of the whole call and of its pass."""
    from bncorrect import api

    start, cpu0 = time.perf_counter(), time.process_time()
    last = [start, cpu0]

    def progress(label: str, _done: int, _total: int | None) -> None:
        if not label.startswith("solve"):  # the pass's reports, not the solves' after it
            last[0], last[1] = time.perf_counter(), time.process_time()

    api.estimate(model, root, b, device="cpu", num_workers=workers, progress=progress)
    return {
        "wall": time.perf_counter() - start,
        "cpu": time.process_time() - cpu0,
        "pass_wall": last[0] - start,
        "pass_cpu": last[1] - cpu0,
    }


def serve(threads: int, allocator: str) -> None:
    """Worker: run the jobs named on stdin (one JSON object a line), answer with their times.
    ``allocator``: "cli" sets the process up as the ``bncorrect`` command does
    (:func:`bncorrect.allocator.retain_freed_memory`), "default" leaves glibc's malloc as it is."""
    retained = "no"
    if allocator == "cli":
        from bncorrect.allocator import retain_freed_memory

        retained = "yes" if retain_freed_memory() else "refused"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet_like()
    ghosts: dict[int, torch.nn.Module] = {}
    grouped_models: dict[int, torch.nn.Module] = {}
    import bncorrect

    print(json.dumps({"ready": str(Path(bncorrect.__file__).parent), "retained": retained}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        root, b, workers = Path(job["root"]), int(job["b"]), int(job["workers"])
        batch = b * max(1, 64 // b)  # the batches estimate reads
        start, cpu0 = time.perf_counter(), time.process_time()
        out: dict[str, Any] = {}
        if job["job"] == "estimate":
            out = run_estimate(model, root, b, workers)
        elif job["job"] == "plain":
            plain_loop(model, root, batch, workers)
        elif job["job"] == "ghost":
            plain_loop(ghosts.setdefault(b, ghost_model(model, b)), root, batch, workers)
        elif job["job"] == "grouped":
            from bncorrect.layers import normalization_mode

            grouped = grouped_models.setdefault(b, grouped_model(model))
            with normalization_mode(grouped, "batch", b):
                plain_loop(grouped, root, batch, workers, eval_mode=False)
        elif job["job"] == "decode":
            plain_loop(model, root, batch, workers, forward=False)
        out.setdefault("wall", time.perf_counter() - start)
        out.setdefault("cpu", time.process_time() - cpu0)
        print(json.dumps(out), flush=True)


class Worker:
    def __init__(self, pythonpath: Path, threads: int, allocator: str = "default") -> None:
        env = dict(os.environ, PYTHONPATH=str(pythonpath))
        args = ["--serve", "--threads", str(threads), "--allocator", allocator]
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "bench_loading.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),  # not the repository: PYTHONPATH alone says which bncorrect
        )
        ready = json.loads(self._line())
        self.package, self.retained = ready["ready"], ready["retained"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("benchmark worker died")
        return line

    def run(self, **job: object) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", type=Path, default=None, help="an older checkout to measure alongside")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["default", "cli"], default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.threads, args.allocator)
        return
    n, b = args.images, args.b
    print(f"host: {host()}; {args.threads} torch thread(s); load average at start {load_average()}")
    print(
        f"data: {n} PNG images of {args.size}x{args.size} in 4 class folders; model: ResNet-style CIFAR "
        f"net of benchmarks/common.py; estimate B = {b}, loader batches of {b * max(1, 64 // b)}; "
        f"{args.repeats} rounds after a warm-up round, jobs alternating, medians"
    )
    new = Worker(HERE.parent, args.threads)
    cli = Worker(HERE.parent, args.threads, "cli")
    old = Worker(args.before.resolve(), args.threads) if args.before is not None else None
    print(f"new: {new.package}" + (f"; before: {old.package}" if old else ""))
    print(f"the command's allocator set-up in the 'cli' worker applied: {cli.retained}")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "images", n, args.size)
        for w in args.workers:
            jobs: dict[str, tuple[Worker, str]] = {"estimate": (cli, "estimate")}
            jobs["library"] = (new, "estimate")
            if old is not None:
                jobs["before"] = (old, "estimate")
            jobs |= {"plain": (new, "plain"), "plain-cli": (cli, "plain")}
            jobs |= {"ghost": (new, "ghost"), "grouped": (new, "grouped")}
            jobs |= {"decode": (new, "decode")}
            times: dict[str, list[dict[str, float]]] = {k: [] for k in jobs}
            for r in range(args.repeats + 1):
                for name, (worker, job) in jobs.items():
                    t = worker.run(job=job, root=str(root), b=b, workers=w)
                    if r:
                        times[name].append(t)

            def med(name: str, key: str = "wall", times: dict[str, list[dict[str, float]]] = times) -> float:
                return statistics.median(t[key] for t in times[name])

            rate = {k: n / med(k) for k in jobs}
            pass_rate = {k: n / med(k, "pass_wall") for k in ("estimate", "library", "before") if k in jobs}
            print(f"\nworkers {w} (load average {load_average()}):")
            for k in jobs:
                extra = f", its pass {pass_rate[k]:.1f} img/s" if k in pass_rate else ""
                print(f"  {k:9s} {rate[k]:8.1f} img/s{extra}")
            for k in pass_rate:
                print(
                    f"  {k}: pass / plain {pass_rate[k] / rate['plain']:.2f}, end to end / plain "
                    f"{rate[k] / rate['plain']:.2f}"
                )
            same = rate["plain-cli"]
            print(
                f"  estimate / plain loop in a process set up like the command (plain-cli): pass "
                f"{pass_rate['estimate'] / same:.2f}, end to end {rate['estimate'] / same:.2f}"
            )
            print(f"  ghost-BN loop / plain (the bound) {rate['ghost'] / rate['plain']:.2f}")
            print(f"  grouped loop / plain {rate['grouped'] / rate['plain']:.2f}")
            if old is not None:
                print(
                    f"  new / before: end to end {rate['estimate'] / rate['before']:.2f}x the rate, pass "
                    f"{pass_rate['estimate'] / pass_rate['before']:.2f}x"
                )
            if w == 0:  # everything ran in the worker process: CPU time ratios are meaningful
                cpu_plain = med("plain", "cpu")
                for k in pass_rate:
                    print(
                        f"  CPU time: {k} pass / plain {cpu_plain / med(k, 'pass_cpu'):.2f}, end to end / "
                        f"plain {cpu_plain / med(k, 'cpu'):.2f}"
                    )
                cpu_cli = med("plain-cli", "cpu")
                print(
                    f"  CPU time: estimate / plain-cli: pass {cpu_cli / med('estimate', 'pass_cpu'):.2f}, "
                    f"end to end {cpu_cli / med('estimate', 'cpu'):.2f}"
                )
                print(f"  CPU time: ghost-BN loop / plain {cpu_plain / med('ghost', 'cpu'):.2f}")
                print(f"  CPU time: grouped loop / plain {cpu_plain / med('grouped', 'cpu'):.2f}")
    new.close()
    cli.close()
    if old is not None:
        old.close()


if __name__ == "__main__":
    main()

"""Cost of `bncorrect tune` as a ratio to one `sweep-alpha` over the same data (issue #14's goal: <= 3x),
and what tune chooses, on the sample checkpoints.

Both run through the Python API the CLI calls (``bncorrect.api.tune`` and ``bncorrect.api.sweep_alpha``,
same model, same validation file, same B, CPU), side by side in one process: the three jobs (sweep-alpha,
tune, tune with ``recalibrate=False``, i.e. without the candidate EvalNorm after recalibration) alternate,
``--repeats`` rounds after one warm-up round, and the median of each is reported with the median of the
per-round ratios. tune's own stages (split, estimate, recalibrate, sweep, fit, held-out) are printed from
its timings of the last round, and the held-out NLL of every candidate (EMA, rule, best global alpha,
EvalNorm offline without and with recalibration, tuned per layer) with the one tune chose.

``--baseline DIR``: also time tune from another copy of the package (a directory holding a ``bncorrect``
folder, e.g. ``git archive <commit> bncorrect | tar -x -C DIR``) in the same rounds: sweep-alpha, tune
(baseline), tune (this tree), so that the two ratios are measured side by side under the same load; the
table then gives both, their ratio, and whether the two chose the same candidate with the same held-out
numbers. Beside the wall-clock ratios it gives the ratios of this process's CPU time (``process_time``),
which waiting for a core on a shared host does not inflate.

``--memory``: instead, peak memory against the data size. For each case the validation set is tiled 1x,
4x and 16x (each copy with small noise, labels kept), and tune runs on it in a fresh process per size, once
with the default cache (fitting examples held in memory up to ``cache_bytes``, 1 GiB) and once with
``cache_bytes=0`` (streamed from the loader every epoch: what happens past the budget). Reported: the
process's peak RSS minus its RSS after the data was loaded (so the data itself, which the caller holds,
is not counted), in MiB.

The process is set up as the ``bncorrect`` command sets up its own (glibc's malloc keeps freed blocks,
:func:`bncorrect.allocator.retain_freed_memory`), since that is what a user of ``bncorrect tune`` runs;
``--allocator default`` leaves malloc as it comes.

Usage: python benchmarks/bench_tune.py [--repeats 3] [--threads N] [--samples DIR] [--cases a,b]
       [--holdout 0.3] [--seed 0] [--baseline DIR] [--memory] [--allocator cli|default]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bncorrect import api  # noqa: E402


def _package_modules() -> dict[str, object]:
    return {
        k: sys.modules.pop(k) for k in list(sys.modules) if k == "bncorrect" or k.startswith("bncorrect.")
    }


class Baseline:
    """Another copy of bncorrect (``DIR/bncorrect``) in this process: its modules are swapped into
    ``sys.modules`` while it runs, so its lazy imports resolve to its own files."""

    def __init__(self, folder: Path) -> None:
        if not (folder / "bncorrect" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {folder}: no bncorrect package there")
        self.folder = folder
        ours = _package_modules()
        sys.path.insert(0, str(folder))
        try:
            self.api = importlib.import_module("bncorrect.api")
            importlib.import_module("bncorrect.tune")
        finally:
            sys.path.remove(str(folder))
            self.modules = _package_modules()
            sys.modules.update(ours)

    @contextlib.contextmanager
    def active(self):  # type: ignore[no-untyped-def]
        ours = _package_modules()
        sys.modules.update(self.modules)
        try:
            yield self.api
        finally:
            self.modules.update(_package_modules())
            sys.modules.update(ours)


MEMORY_CHILD = r"""
import resource, sys, numpy as np, torch
torch.set_num_threads(1)
from bncorrect import api
from bncorrect.tune import tune_model
path, b, copies, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
d = np.load(path)
rng = np.random.default_rng(0)
x = np.concatenate([d["x"] + (0 if i == 0 else 0.01) * rng.standard_normal(d["x"].shape).astype(d["x"].dtype)
                    for i in range(copies)])
y = np.concatenate([d["y"]] * copies)
src = api.open_model(path.replace("val.npz", "model.pt"))
ds = api.open_data((torch.from_numpy(x), torch.from_numpy(y)))
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
base = rss()
kw = {} if cache < 0 else {"cache_bytes": cache}
r = tune_model(src.model, ds, b, device="cpu", **kw)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{len(x)} {max(0.0, peak - base):.1f} {r.fit.cache}")
"""


def memory(args: argparse.Namespace) -> None:
    print("| case | examples | cache | peak RSS above the loaded data, MiB | fit's cache |")
    print("|---|---|---|---|---|")
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        path = args.samples / name / "val.npz"
        b = int(name.rsplit("_b", 1)[1])
        for cache, label in ((-1, "default (1 GiB)"), (0, "0 (streamed)")):
            for copies in (1, 4, 16):
                out = subprocess.run(
                    [sys.executable, "-c", MEMORY_CHILD, str(path), str(b), str(copies), str(cache)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                    env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
                ).stdout.split(maxsplit=2)
                print(f"| {name} | {out[0]} | {label} | {out[1]} | {out[2].strip()} |", flush=True)


CASES = ("mnist1d_b2", "digits_b2", "mnist1d_b32", "digits_b32")


def host_label() -> str:
    """``lscpu``'s model name (the CPU), else the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--samples", type=Path, default=ROOT / "sample_checkpoints")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--holdout", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", type=Path, default=None, help="also time tune from DIR/bncorrect")
    ap.add_argument("--memory", action="store_true", help="peak memory at 1x/4x/16x the data instead")
    ap.add_argument(
        "--allocator",
        choices=["cli", "default"],
        default="cli",
        help="cli (default): set the process up as the bncorrect command does (bncorrect.allocator); "
        "default: glibc's malloc as it comes",
    )
    args = ap.parse_args()
    if args.allocator == "cli":
        from bncorrect.allocator import retain_freed_memory

        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_tune {datetime.date.today()}")
    from bncorrect.allocator import status

    print(
        f"host: {host_label()}; {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}; {status()}"
    )
    if args.memory:
        memory(args)
        return
    print(f"repeats {args.repeats} (after 1 warm-up round), jobs alternating; CPU; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} at the start")  # fmt: skip
    base = Baseline(args.baseline.resolve()) if args.baseline is not None else None
    if base is not None:
        print(f"baseline: {base.folder}/bncorrect, timed in the same rounds (sweep, tune baseline, tune this "
              "tree)\n")  # fmt: skip
        print("| case | sweep-alpha s | tune s baseline | tune s | tune / sweep baseline | tune / sweep | "
              "CPU time: tune / sweep baseline | CPU time: tune / sweep | tune / tune baseline | same choice "
              "and held-out | fit stage s baseline -> this |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        print()
        print(
            "| case | sweep-alpha s | tune s | tune / sweep | tune --no-recalibrate / sweep | tune stages s |"
        )
        print("|---|---|---|---|---|---|")
    summaries = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        folder = args.samples / name
        model, data = folder / "model.pt", folder / "val.npz"
        if not model.is_file():
            print(f"| {name} | missing ({model}) | | | |")
            continue
        b = int(name.rsplit("_b", 1)[1])
        # every job opens the checkpoint itself: the API corrects a Source object it is given in place, so a
        # Source shared across jobs would carry one job's written correction (e.g. recalibrated
        # statistics) into the next
        source = model
        dataset = api.open_data(data)
        last: dict[str, api.Outcome] = {}

        def run_sweep(source: object = source, dataset: object = dataset, b: int = b) -> None:
            api.sweep_alpha(source, dataset, train_batch_size=b, device="cpu")

        def run_tune(
            source: object = source, dataset: object = dataset, b: int = b, last: dict = last
        ) -> None:
            last["outcome"] = api.tune(source, dataset, b, holdout=args.holdout, seed=args.seed, device="cpu")

        def run_plain(source: object = source, dataset: object = dataset, b: int = b) -> None:
            kw = {"holdout": args.holdout, "seed": args.seed, "device": "cpu", "recalibrate": False}
            api.tune(source, dataset, b, **kw)

        def run_base(model: Path = model, data: Path = data, b: int = b, last: dict = last) -> None:
            assert base is not None
            with base.active() as base_api:
                src, ds = base_api.open_model(model), base_api.open_data(data)
                last["base"] = base_api.tune(src, ds, b, holdout=args.holdout, seed=args.seed, device="cpu")

        jobs = [("sweep", run_sweep), ("tune", run_tune)]
        if base is not None:  # against a baseline: the default tune only, to keep the rounds short
            jobs.insert(1, ("base", run_base))
        else:
            jobs.append(("plain", run_plain))
        times: dict[str, list[float]] = {job: [] for job, _ in jobs}
        cpu: dict[str, list[float]] = {job: [] for job, _ in jobs}  # this process's CPU time
        for round_ in range(args.repeats + 1):
            for job, fn in jobs:
                t, c = time.perf_counter(), time.process_time()
                fn()
                if round_:
                    times[job].append(time.perf_counter() - t)
                    cpu[job].append(time.process_time() - c)
        ratios = [t / s for t, s in zip(times["tune"], times["sweep"], strict=True)]
        sweep_s, tune_s = statistics.median(times["sweep"]), statistics.median(times["tune"])
        result = last["outcome"].report["tune"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
        if base is None:
            plain = [t / s for t, s in zip(times["plain"], times["sweep"], strict=True)]
            print(
                f"| {name} | {sweep_s:.2f} | {tune_s:.2f} | **{statistics.median(ratios):.2f}** | "
                f"{statistics.median(plain):.2f} | {stages} |"
            )
        else:
            old = last["base"].report["tune"]
            base_ratios = [t / s for t, s in zip(times["base"], times["sweep"], strict=True)]
            speed = [t / o for t, o in zip(times["tune"], times["base"], strict=True)]
            cpu_new = statistics.median(t / s for t, s in zip(cpu["tune"], cpu["sweep"], strict=True))
            cpu_old = statistics.median(t / s for t, s in zip(cpu["base"], cpu["sweep"], strict=True))
            same = old.chosen.kind == result.chosen.kind and all(
                abs(a.heldout.nll - b_.heldout.nll) <= 1e-4 and a.heldout.top1 == b_.heldout.top1
                for a, b_ in zip(old.rows, result.rows, strict=True)
            )
            print(
                f"| {name} | {sweep_s:.2f} | {statistics.median(times['base']):.2f} | {tune_s:.2f} | "
                f"{statistics.median(base_ratios):.2f} | **{statistics.median(ratios):.2f}** | "
                f"{cpu_old:.2f} | **{cpu_new:.2f}** | "
                f"{statistics.median(speed):.2f} | {'yes' if same else 'NO'} ({result.chosen.kind}) | "
                f"{old.timings['fit']:.2f} -> {result.timings['fit']:.2f} |"
            )
        summaries.append((name, result))
    print(
        "\nHeld-out NLL (top-1 %) of every candidate; ◀ chosen. Fitting part / held-out part sizes, the tuned"
    )
    print("fit's L1 strength, epochs and the layers it leaves at alpha = beta = 0.\n")
    labels = {"ema": "EMA", "rule": "rule 1/B^2", "global": "best global alpha",
              "evalnorm": "EvalNorm offline", "evalnorm-recal": "EvalNorm + recal. (train)",
              "tuned": "tuned per layer"}  # fmt: skip
    kinds = [row.kind for row in summaries[0][1].rows] if summaries else list(labels)
    print("| case | " + " | ".join(labels[k] for k in kinds) + " | tuned: L1, epochs, plain |")
    print("|" + "---|" * (len(kinds) + 2))
    for name, result in summaries:
        cells = []
        for row in result.rows:
            mark = " ◀" if row is result.chosen else ""
            extra = f" a={row.alpha:g}" if row.kind == "global" else ""
            cells.append(f"{row.heldout.nll:.4f} ({100 * row.heldout.top1:.1f}){extra}{mark}")
        fit = result.fit
        plain = f"{len(result.zero_layers)}/{len(result.layers)}"
        print(
            f"| {name} (n {result.n_fit}/{result.n_heldout}) | "
            + " | ".join(cells)
            + f" | {fit.best.strength:g}, {fit.epochs}, {plain} |"
        )
    for name, result in summaries:
        coeffs = ", ".join(
            f"{ly['name']} {ly['alpha']:.2f}/{ly['beta']:.2f}"
            for ly in result.layer_rows()
            if isinstance(ly["alpha"], float) and isinstance(ly["beta"], float)
        )
        print(f"\n{name}: tuned alpha/beta per layer: {coeffs}")
        for note in result.notes:
            print(f"  note: {note}")


if __name__ == "__main__":
    main()

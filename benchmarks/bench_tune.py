"""Cost of `bncorrect tune` as a ratio to one `sweep-alpha` over the same data (issue #14's goal: <= 3x),
and what tune chooses, on the sample checkpoints.

Both run through the Python API the CLI calls (``bncorrect.api.tune`` and ``bncorrect.api.sweep_alpha``,
same model, same validation file, same B, CPU), side by side in one process: the two jobs alternate,
``--repeats`` rounds after one warm-up round, and the median of each is reported with the median of the
per-round ratios. tune's own stages (split, estimate, sweep, fit, held-out) are printed from its timings
of the last round, and the held-out NLL of every candidate (EMA, rule, best global alpha, EvalNorm offline,
tuned per layer) with the one tune chose.

Usage: python benchmarks/bench_tune.py [--repeats 3] [--threads N] [--samples DIR] [--cases a,b]
       [--holdout 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_tune {datetime.date.today()}")
    print(
        f"host: {host_label()}; {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(f"repeats {args.repeats} (after 1 warm-up round), jobs alternating; CPU\n")
    print("| case | sweep-alpha s | tune s | tune / sweep | tune stages (s) |")
    print("|---|---|---|---|---|")
    summaries = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        folder = args.samples / name
        model, data = folder / "model.pt", folder / "val.npz"
        if not model.is_file():
            print(f"| {name} | missing ({model}) | | | |")
            continue
        b = int(name.rsplit("_b", 1)[1])
        source = api.open_model(model)
        dataset = api.open_data(data)
        last: dict[str, api.Outcome] = {}

        def run_sweep(source: object = source, dataset: object = dataset, b: int = b) -> None:
            api.sweep_alpha(source, dataset, train_batch_size=b, device="cpu")

        def run_tune(
            source: object = source, dataset: object = dataset, b: int = b, last: dict = last
        ) -> None:
            last["outcome"] = api.tune(source, dataset, b, holdout=args.holdout, seed=args.seed, device="cpu")

        times: dict[str, list[float]] = {"sweep": [], "tune": []}
        for round_ in range(args.repeats + 1):
            for job, fn in (("sweep", run_sweep), ("tune", run_tune)):
                t = time.perf_counter()
                fn()
                if round_:
                    times[job].append(time.perf_counter() - t)
        ratios = [t / s for t, s in zip(times["tune"], times["sweep"], strict=True)]
        sweep_s, tune_s = statistics.median(times["sweep"]), statistics.median(times["tune"])
        result = last["outcome"].report["tune"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
        print(f"| {name} | {sweep_s:.2f} | {tune_s:.2f} | **{statistics.median(ratios):.2f}** | {stages} |")
        summaries.append((name, result))
    print(
        "\nHeld-out NLL (top-1 %) of every candidate; ◀ chosen. Fitting part / held-out part sizes, the tuned"
    )
    print("fit's L1 strength, epochs and the layers it leaves at alpha = beta = 0.\n")
    head = ("case", "EMA", "rule 1/B^2", "best global alpha", "EvalNorm offline", "tuned per layer")
    print("| " + " | ".join(head) + " | tuned: L1, epochs, plain |")
    print("|---|---|---|---|---|---|---|")
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

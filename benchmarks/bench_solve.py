"""One layer's grid solve in ``estimate``: ``correction.l_aux_sorted`` of this checkout against an older one.

The candidates of one grid search (11 x 11, then five 7 x 7 refinements: 121 + 5 x 49 (alpha, beta) pairs)
are evaluated on 4096 sorted (example, channel) rows of 64 values in float32, as ``EvalNormEstimator.solve``
does, with this checkout's ``l_aux_sorted`` and with the one in ``--before`` (its ``bncorrect/correction.py``
is loaded as a separate module: it imports nothing from the package), alternating, medians of wall and CPU
time. The results of the two are compared: bit for bit, their largest relative difference (a new float32
formulation rounds differently), and the best candidate of every grid level. The host and the load average
are printed.

    python benchmarks/bench_solve.py --before /tmp/base [--threads 1] [--repeats 9]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loading import host, load_average

from bncorrect import correction as new_correction


def load_correction(checkout: Path) -> object:
    spec = importlib.util.spec_from_file_location(
        "correction_before", checkout / "bncorrect" / "correction.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="an older checkout")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--positions", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = load_correction(args.before.resolve())
    g = torch.Generator().manual_seed(0)
    n, s = args.rows, args.positions
    values = (torch.randn(1, n, s, generator=g) * 2).sort(-1).values
    prefix = torch.cat([torch.zeros(1, n, 1), values.cumsum(-1)], -1)
    mu_b, mu_i = (torch.randn(1, n, generator=g) * 0.3 for _ in range(2))
    var_b, var_i = (torch.rand(1, n, generator=g) + 0.5 for _ in range(2))
    rm, rv = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) + 0.5
    var_b[0, :5] = rv[:5]  # rows where the two normalizations coincide at alpha = beta = 0
    sizes = [121] + [49] * 5
    cands = [
        (torch.rand(k, dtype=torch.float64, generator=g), torch.rand(k, dtype=torch.float64, generator=g))
        for k in sizes
    ]
    cands[0][0][0] = cands[0][1][0] = 0.0

    def solve(fn: object) -> list[torch.Tensor]:
        return [fn(values, prefix, mu_b, var_b, mu_i, var_i, rm, rv, 1e-5, a, b) for a, b in cands]  # type: ignore[operator]

    pairs = list(zip(solve(old.l_aux_sorted), solve(new_correction.l_aux_sorted), strict=True))  # type: ignore[attr-defined]
    same = all(torch.equal(x, y) for x, y in pairs)
    # float32 rounding differs when the formulation changes: the largest relative difference, and whether
    # every grid level keeps the same best candidate
    diff = max(float(((x.double() - y.double()).abs() / y.double().abs()).max()) for x, y in pairs)
    same_argmin = all(int(x.argmin()) == int(y.argmin()) for x, y in pairs)
    jobs = {"before": old.l_aux_sorted, "new": new_correction.l_aux_sorted}  # type: ignore[attr-defined]
    wall: dict[str, list[float]] = {k: [] for k in jobs}
    cpu: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(args.repeats + 1):
        for k, fn in jobs.items():
            t, c = time.perf_counter(), time.process_time()
            solve(fn)
            if r:
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    print(f"host: {host()}; {args.threads} torch thread(s); load average {load_average()}; pid {os.getpid()}")
    print(
        f"one grid solve: {sum(sizes)} candidates on {n} rows of {s} values, float32, {args.repeats} rounds"
    )
    med = {k: (statistics.median(wall[k]) * 1e3, statistics.median(cpu[k]) * 1e3) for k in jobs}
    for k, (w, c) in med.items():
        print(f"  {k:6s} wall {w:8.1f} ms   CPU {c:8.1f} ms")
    ratio_wall, ratio_cpu = med["before"][0] / med["new"][0], med["before"][1] / med["new"][1]
    print(
        f"  before / new: wall {ratio_wall:.2f}x, CPU {ratio_cpu:.2f}x; results identical bit for bit: {same}"
        f" (largest relative difference {diff:.1e}; same best candidate at every level: {same_argmin})"
    )


if __name__ == "__main__":
    main()

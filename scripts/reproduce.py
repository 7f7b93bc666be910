"""Reproduce the papers' findings on the sample tasks over several seeds and normalization batch sizes B.

For each dataset (digits, MNIST-1D), B in {2, 4, 8, 32} and seed, a sample network is trained exactly as
``scripts/make_samples.py`` trains the committed samples (ghost BN over chunks of B inside SGD batches of
64; deterministic per seed), then corrected with every bncorrect method through the public API:

- EMA: plain inference BN (alpha = beta = 0);
- rule 1/B^2 (EvalNorm's rule of thumb);
- EvalNorm offline (``bncorrect.estimate``; per-layer alpha/beta minimising L_aux over the tuning half);
- EvalNorm offline after training-consistent recalibration (``estimate --recalibrate --upstream train``);
- the best global alpha (``sweep-alpha``, alpha = beta for every layer), chosen by NLL and by top-1 on the
  tuning half;
- tune (``bncorrect.tune``): every candidate above (EMA, rule, best global alpha, EvalNorm offline) and
  per-layer alpha/beta fitted to the NLL, fitted on 70% of the tuning half and chosen on the other 30%
  (its own seeded, stratified split, seed = the network's seed; EMA when nothing beat it there); the
  correction it writes (``tuned.safetensors`` in the network's folder) is scored on the test half like
  every other row, and the record keeps which candidate it chose;
- for reference, training-mode normalization over consecutive groups of B examples (what training saw).

To avoid choosing and scoring on the same examples, each validation set is split in two fixed halves: the
first half (tuning) is what estimate and the sweep see, the second half (test) is where every row of the
table is measured. The outputs are a JSON file with every number, a Markdown table (mean +- standard
deviation over seeds, in the spirit of EvalNorm's Table 1) and a PNG of the best global alpha against B
(in the spirit of Four Things' Figure 9)::

    python scripts/reproduce.py --seeds 0,1,2 --batch-sizes 2,4,8,32 --out docs/reproduction

Trained networks are cached in ``--work`` (default ``<out>/checkpoints``): re-running only evaluates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

METHODS = (
    "EMA",
    "rule 1/B^2",
    "EvalNorm offline",
    "EvalNorm + recalibrate",
    "best alpha (NLL)",
    "best alpha (top-1)",
    "tune",
    "train-mode, groups of B",
)


def _train(job: tuple[str, int, int, str]) -> str:
    """Train one (dataset, B, seed) network into the cache unless it is there; returns the folder."""
    import make_samples

    dataset, b, seed, work = job
    folder = Path(work) / make_samples.sample_name(dataset, b, seed)
    if not (folder / "model.pt").is_file():
        model, vx, vy, card = make_samples.train_sample(dataset, b, seed, alphas=None)
        make_samples.write_sample(Path(work), model, vx, vy, card)
    return str(folder)


def _halves(folder: Path) -> tuple[Path, Path]:
    """Write the tuning and test halves of ``val.npz`` (fixed split: first half / second half)."""
    data = np.load(folder / "val.npz")
    x, y = data["x"], data["y"]
    half = len(x) // 2
    tune, test = folder / "tune.npz", folder / "test.npz"
    np.savez(tune, x=x[:half], y=y[:half])
    np.savez(test, x=x[half:], y=y[half:])
    return tune, test


def _metrics(model, x, y) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import torch
    from torch.nn import functional as F

    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    return {"nll": float(F.cross_entropy(logits, y)), "top1": float((logits.argmax(1) == y).double().mean())}


def evaluate(folder: Path, b: int, seed: int = 0) -> dict[str, dict[str, float | str | None]]:
    """Every method's test-half NLL/top-1 for the network in ``folder`` (``seed``: tune's split)."""
    import torch

    import bncorrect
    from bncorrect import api
    from bncorrect.demo import batch_mode_metrics

    torch.set_num_threads(1)
    tune, test = _halves(folder)
    model_path = folder / "model.pt"
    data = np.load(test)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    rows: dict[str, dict[str, float | str | None]] = {}

    plain = bncorrect.load(model_path)
    rows["EMA"] = {**_metrics(plain, x, y), "alpha": 0.0}
    rows["rule 1/B^2"] = {
        **_metrics(api.rule(model_path, b).model, x, y),
        "alpha": bncorrect.correction.rule_of_thumb(b),
    }
    est = api.estimate(model_path, tune, b, device="cpu")
    alphas = [ly.alpha for ly in est.report["estimate"].layers]
    rows["EvalNorm offline"] = {**_metrics(est.model, x, y), "alpha": statistics.fmean(alphas)}
    rec = api.estimate(model_path, tune, b, recalibrate_first=True, upstream="train", device="cpu")
    alphas = [ly.alpha for ly in rec.report["estimate"].layers]
    rows["EvalNorm + recalibrate"] = {**_metrics(rec.model, x, y), "alpha": statistics.fmean(alphas)}
    sweep = api.sweep_alpha(model_path, tune, train_batch_size=b, device="cpu").report["sweep"]
    for label, metric in (("best alpha (NLL)", "nll"), ("best alpha (top-1)", "top1")):
        a = float(sweep.best_row(metric).alpha)
        rows[label] = {**_metrics(api.weight(model_path, a).model, x, y), "alpha": a}
    out = folder / "tuned.safetensors"
    out.unlink(missing_ok=True)
    tuned = api.tune(model_path, tune, b, seed=seed, device="cpu", out=out).report["tune"]
    rows["tune"] = {
        **_metrics(api.apply(model_path, out).model, x, y),
        "alpha": None,
        "chosen": tuned.chosen.kind,
        "heldout_ema_nll": tuned.ema.heldout.nll,
        "heldout_chosen_nll": tuned.chosen.heldout.nll,
        "n_zero_layers": len(tuned.zero_layers),
    }
    loader = [(x[i : i + 10 * b], y[i : i + 10 * b]) for i in range(0, len(x), 10 * b)]
    ref = batch_mode_metrics(bncorrect.load(model_path), loader, b)
    rows["train-mode, groups of B"] = {"nll": ref.nll, "top1": ref.top1, "alpha": None}
    return rows


def _job(job: tuple[str, int, int, str]) -> dict[str, object]:
    t0 = time.perf_counter()
    folder = Path(_train(job))
    dataset, b, seed, _ = job
    rows = evaluate(folder, b, seed)
    return {"dataset": dataset, "B": b, "seed": seed, "rows": rows, "seconds": time.perf_counter() - t0}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(results: list[dict[str, object]], dataset: str) -> str:
    """Rows: B; columns: methods; cells: test NLL and top-1 error (%), mean +- sd over seeds."""
    sizes = sorted({int(r["B"]) for r in results if r["dataset"] == dataset})  # type: ignore[call-overload]
    head = "| B | " + " | ".join(METHODS) + " |"
    lines = [head, "|---" * (len(METHODS) + 1) + "|"]
    for b in sizes:
        runs = [r for r in results if r["dataset"] == dataset and r["B"] == b]
        cells = []
        for m in METHODS:
            nll = _mean_sd([r["rows"][m]["nll"] for r in runs])  # type: ignore[index]
            err = _mean_sd([100 * (1 - r["rows"][m]["top1"]) for r in runs])  # type: ignore[index]
            cells.append(f"{nll[0]:.3f} ± {nll[1]:.3f} ({err[0]:.1f} ± {err[1]:.1f}%)")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tune_table(results: list[dict[str, object]]) -> str:
    """What tune chose per dataset and B (every seed), and its test NLL against EMA's and the best
    global alpha's: mean over seeds, and on how many seeds it was no worse than EMA."""
    lines = [
        "| dataset | B | tune chose (seeds) | tune NLL | EMA NLL | best alpha NLL | seeds tune <= EMA |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(str(r["dataset"]), int(r["B"])) for r in results})  # type: ignore[call-overload]
    for ds, b in keys:
        runs = sorted((r for r in results if r["dataset"] == ds and r["B"] == b), key=lambda r: r["seed"])  # type: ignore[arg-type,return-value]
        runs = [r for r in runs if "tune" in r["rows"]]  # type: ignore[operator]
        if not runs:
            continue
        get = lambda r, m: r["rows"][m]["nll"]  # noqa: E731
        chose = ", ".join(str(r["rows"]["tune"]["chosen"]) for r in runs)  # type: ignore[index]
        ok = sum(get(r, "tune") <= get(r, "EMA") for r in runs)
        lines.append(
            f"| {ds} | {b} | {chose} | {statistics.fmean(get(r, 'tune') for r in runs):.4f} | "
            f"{statistics.fmean(get(r, 'EMA') for r in runs):.4f} | "
            f"{statistics.fmean(get(r, 'best alpha (NLL)') for r in runs):.4f} | {ok}/{len(runs)} |"
        )
    return "\n".join(lines)


def alpha_table(results: list[dict[str, object]]) -> str:
    """Best global alpha (by NLL, by top-1) per dataset and B: mean, and every seed's value."""
    lines = [
        "| dataset | B | best alpha by NLL (seeds) | best alpha by top-1 (seeds) | 1/B^2 |",
        "|---|---|---|---|---|",
    ]
    keys = sorted({(str(r["dataset"]), int(r["B"])) for r in results})  # type: ignore[call-overload]
    for ds, b in keys:
        runs = sorted((r for r in results if r["dataset"] == ds and r["B"] == b), key=lambda r: r["seed"])  # type: ignore[arg-type,return-value]
        nll = [r["rows"]["best alpha (NLL)"]["alpha"] for r in runs]  # type: ignore[index]
        top = [r["rows"]["best alpha (top-1)"]["alpha"] for r in runs]  # type: ignore[index]
        fmt = lambda v: f"{statistics.fmean(v):.3f} ({', '.join(f'{a:.3g}' for a in v)})"  # noqa: E731
        lines.append(f"| {ds} | {b} | {fmt(nll)} | {fmt(top)} | {1 / b**2:.4f} |")
    return "\n".join(lines)


def plot(results: list[dict[str, object]], path: Path) -> None:
    """Best global alpha against B (log scale), mean and seeds, per dataset, with the 1/B^2 rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    sizes = sorted({int(r["B"]) for r in results})  # type: ignore[call-overload]
    for ax, metric in zip(axes, ("NLL", "top-1"), strict=True):
        for ds, color in (("digits", "tab:blue"), ("mnist1d", "tab:orange")):
            runs = [r for r in results if r["dataset"] == ds]
            if not runs:
                continue
            means = []
            for b in sizes:
                vals = [r["rows"][f"best alpha ({metric})"]["alpha"] for r in runs if r["B"] == b]  # type: ignore[index]
                ax.scatter([b] * len(vals), vals, color=color, alpha=0.35, s=18)
                means.append(statistics.fmean(vals) if vals else math.nan)
            ax.plot(sizes, means, "-o", color=color, label=f"{ds} (mean over seeds)")
        ax.plot(sizes, [1 / b**2 for b in sizes], "k--", label="rule 1/B^2")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("normalization batch size B in training")
        ax.set_ylabel("best inference example weight alpha")
        ax.set_title(f"best alpha by validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--batch-sizes", default="2,4,8,32")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction")
    parser.add_argument(
        "--work", type=Path, default=None, help="trained-network cache (default OUT/checkpoints)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="networks trained/evaluated in parallel")
    args = parser.parse_args(argv)
    work = args.work or args.out / "checkpoints"
    work.mkdir(parents=True, exist_ok=True)
    jobs = [
        (ds, int(b), int(s), str(work))
        for ds in args.datasets.split(",")
        for b in args.batch_sizes.split(",")
        for s in args.seeds.split(",")
    ]
    results: list[dict[str, object]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for res in pool.map(_job, jobs):
            results.append(res)
            best = res["rows"]["best alpha (NLL)"]  # type: ignore[index]
            ema = res["rows"]["EMA"]  # type: ignore[index]
            print(
                f"{res['dataset']} B={res['B']} seed={res['seed']}: EMA NLL {ema['nll']:.4f}, "
                f"best alpha {best['alpha']:g} NLL {best['nll']:.4f} ({res['seconds']:.0f} s)",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = [
        f"Seeds {args.seeds}; test half of each validation set; NLL ± sd (top-1 error ± sd).",
        *[f"\n### {ds}\n\n{markdown_table(results, ds)}" for ds in args.datasets.split(",")],
        f"\n### Best global alpha\n\n{alpha_table(results)}",
        f"\n### What tune chose\n\n{tune_table(results)}",
    ]
    (args.out / "tables.md").write_text("\n".join(text) + "\n")
    plot(results, args.out / "best_alpha_vs_B.png")
    print("\n".join(text))
    print(f"wrote {args.out}/results.json, tables.md, best_alpha_vs_B.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

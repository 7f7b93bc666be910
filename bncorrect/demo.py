"""``bncorrect demo``: the whole tool on the shipped sample checkpoints, and one comparison table.

For each sample (a dataset trained with BN over ghost batches of B examples, B = 2 beside B = 32) it runs
what a user would run, through the same API functions as the CLI commands:

1. ``inspect``: the BN layers;
2. ``rule``: alpha = beta = 1/B^2 (written as a corrections file);
3. ``estimate``: offline EvalNorm alpha/beta per layer over the validation data (a corrections file);
4. ``sweep-alpha``: a grid of global alphas, with EMA, the rule and the EvalNorm file as extra rows, on the
   labelled validation data (plot and JSON report);
5. ONNX export of the NLL-best global alpha, verified against PyTorch in onnxruntime;
6. ``tune``: the validation data split in halves (seeded, stratified by label); every candidate (EMA, the
   rule, the best global alpha, EvalNorm offline with and without recalibration first, per-layer
   alpha/beta fitted to the NLL) fitted on one
   half and scored on the other, the held-out half; the chosen one written (``tuned.safetensors``, its
   JSON report and per-layer plot). Its numbers are on the held-out half only, so they are shown in a
   table of their own, not beside the whole-set rows of steps 1-5;

and, as the reference the corrections try to approach, the model with *training-mode* normalization over
consecutive groups of B validation examples (the statistics training used; not usable at inference for
single examples). The result is data (:class:`DemoResult`); the CLI renders it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .errors import DataError, UsageError

DATASETS = ("digits", "mnist1d")
BATCH_SIZES = (2, 32)
#: Method rows of the comparison table, in order.
METHODS = (
    "EMA (plain BN)",
    "rule 1/B^2",
    "EvalNorm offline",
    "best global alpha (NLL)",
    "best global alpha (top-1)",
    "train-mode BN, groups of B",
)
FAST_ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.3)
#: tune's held-out fraction in the demo: half the validation data (the other half fits the candidates).
TUNE_HOLDOUT = 0.5
#: Candidates of the demo's tune table, in order: (kind in :data:`bncorrect.tune.KINDS`, label).
TUNE_ROWS = (
    ("ema", "EMA (plain BN)"),
    ("rule", "rule 1/B^2"),
    ("global", "best global alpha"),
    ("evalnorm", "EvalNorm offline"),
    ("evalnorm-recal", "EvalNorm + recalibrate (train)"),
    ("tuned", "tuned per layer"),
)


def default_samples_dir() -> Path:
    """The repository's ``sample_checkpoints/`` (present in a clone / editable install)."""
    return Path(__file__).resolve().parents[1] / "sample_checkpoints"


@dataclass
class MethodResult:
    """Validation metrics of one way of normalizing at inference."""

    nll: float
    top1: float
    alpha: float | None = None
    n: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"nll": self.nll, "top1": self.top1, "alpha": self.alpha, "n": self.n}


@dataclass
class TuneSummary:
    """What ``tune`` measured on one sample: every candidate on the held-out half, and what it wrote."""

    holdout: float
    n_fit: int
    n_heldout: int
    heldout: dict[str, MethodResult]  # kind -> held-out NLL/top-1
    fit: dict[str, MethodResult]  # kind -> fitting-part NLL/top-1
    chosen: str  # the kind written
    chosen_label: str
    zero_layers: int
    n_layers: int
    heldout_indices: list[int]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "holdout": self.holdout,
            "n_fit": self.n_fit,
            "n_heldout": self.n_heldout,
            "heldout": {k: v.as_dict() for k, v in self.heldout.items()},
            "fit": {k: v.as_dict() for k, v in self.fit.items()},
            "chosen": self.chosen,
            "chosen_label": self.chosen_label,
            "zero_layers": self.zero_layers,
            "n_layers": self.n_layers,
            "heldout_indices": list(self.heldout_indices),
            "notes": list(self.notes),
        }


@dataclass
class SampleResult:
    """Everything the demo did on one sample checkpoint."""

    name: str
    train_batch_size: int
    n_layers: int
    n_examples: int
    methods: dict[str, MethodResult]
    evalnorm_alpha_range: tuple[float, float]
    files: dict[str, Path]
    onnx_max_abs_diff: float | None
    tune: TuneSummary | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "train_batch_size": self.train_batch_size,
            "n_layers": self.n_layers,
            "n_examples": self.n_examples,
            "methods": {k: v.as_dict() for k, v in self.methods.items()},
            "evalnorm_alpha_range": list(self.evalnorm_alpha_range),
            "files": {k: str(v) for k, v in self.files.items()},
            "onnx_max_abs_diff": self.onnx_max_abs_diff,
            "tune": None if self.tune is None else self.tune.as_dict(),
        }


@dataclass
class DemoResult:
    """The demo's samples, in the order run, and where it wrote its files."""

    out_dir: Path
    samples: list[SampleResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "samples": [s.as_dict() for s in self.samples]}


def _sample_dirs(samples_dir: Path, datasets: Sequence[str], batch_sizes: Sequence[int]) -> list[Path]:
    if not samples_dir.is_dir():
        raise DataError(
            "the sample checkpoints are not there",
            path=samples_dir,
            hint="run the demo from a clone of the bncorrect repository, pass --samples DIR, or create "
            "them with `python scripts/make_samples.py --out DIR`",
        )
    dirs = []
    for ds in datasets:
        if ds not in DATASETS:
            raise UsageError(f"unknown sample dataset {ds!r}", hint=f"choose from {', '.join(DATASETS)}")
        for b in batch_sizes:
            d = samples_dir / f"{ds}_b{b}"
            missing = [f for f in ("model.pt", "val.npz") if not (d / f).is_file()]
            if missing:
                raise DataError(
                    f"sample {d.name} lacks {', '.join(missing)}",
                    path=d,
                    hint=f"create it with `python scripts/make_samples.py --only {ds} --batch-sizes {b} "
                    f"--out {samples_dir}`",
                )
            dirs.append(d)
    return dirs


@torch.no_grad()
def batch_mode_metrics(model: torch.nn.Module, loader: Any, group_size: int) -> MethodResult:
    """NLL/top-1 with training-mode normalization over consecutive groups of ``group_size`` examples
    (only BN in batch mode, running statistics untouched; an incomplete last group is left out)."""
    from .layers import correct_model, normalization_mode, strip_corrections

    model = correct_model(model, 0.0)
    nll_sum, correct, n = 0.0, 0, 0
    try:
        with normalization_mode(model, "batch", group_size):
            for x, y in loader:
                keep = len(x) - len(x) % group_size
                if keep == 0:
                    continue
                logits = model(x[:keep]).double()
                nll_sum += float(F.cross_entropy(logits, y[:keep], reduction="sum"))
                correct += int((logits.argmax(1) == y[:keep]).sum())
                n += keep
    finally:
        strip_corrections(model)
    if n == 0:
        raise DataError(f"fewer validation examples than one group of {group_size}")
    return MethodResult(nll_sum / n, correct / n, None, n)


def run_sample(
    sample: Path,
    out_dir: Path,
    *,
    alphas: Sequence[float] | None = None,
    max_examples: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> SampleResult:
    """The demo's steps on one sample folder (``model.pt``, ``val.npz``, ``model_card.json``)."""
    import json

    from . import api

    model_path = sample / "model.pt"
    dataset = api.open_data(sample / "val.npz")  # read once, used by estimate, the sweep and the reference
    card_path = sample / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    b = int(card.get("train_batch_size") or sample.name.rsplit("_b", 1)[-1].split("_")[0])
    out = out_dir / sample.name
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "rule": out / "rule.safetensors",
        "evalnorm": out / "evalnorm.safetensors",
        "sweep_plot": out / "sweep.png",
        "sweep_report": out / "sweep.json",
        "onnx": out / "corrected.onnx",
        "tuned": out / "tuned.safetensors",
        "tune_report": out / "tune.json",
        "tune_plot": out / "tune.png",
    }
    tag = f"{sample.name}: "
    step = None if progress is None else (lambda d, c, t: progress(tag + d, c, t))

    layers = api.inspect(model_path)
    api.rule(model_path, b, out=files["rule"])
    est = api.estimate(
        model_path,
        dataset,
        b,
        out=files["evalnorm"],
        max_examples=max_examples,
        device=device,
        seed=seed,
        progress=step,
    )
    alphas_est = [ly.alpha for ly in est.report["estimate"].layers]
    sweep = api.sweep_alpha(
        model_path,
        dataset,
        alphas=alphas,
        train_batch_size=b,
        corrections=files["evalnorm"],
        metric="nll",
        out=files["onnx"],
        plot=files["sweep_plot"],
        report=files["sweep_report"],
        max_examples=max_examples,
        device=device,
        seed=seed,
        progress=step,
        export=api.ExportOptions(),
    )
    result = sweep.report["sweep"]
    export = sweep.report.get("export")

    def row(r: Any) -> MethodResult:
        return MethodResult(r.nll, r.top1, r.alpha, r.n)

    rule_rows = [r for r in result.rows if "rule" in r.kind.split("+")]
    extra_rows = [r for r in result.rows if r.kind == "extra"]
    methods = {
        METHODS[0]: row(result.ema),
        METHODS[1]: row(rule_rows[0]),
        METHODS[2]: row(extra_rows[0]),
        METHODS[3]: row(result.best_row("nll")),
        METHODS[4]: row(result.best_row("top1")),
    }
    loader, _, _ = api._loader(
        dataset, b * max(1, 256 // b), shuffle=False, seed=seed, num_workers=0, max_examples=max_examples
    )
    plain = api.open_model(model_path)
    methods[METHODS[5]] = batch_mode_metrics(plain.model, loader, b)
    tuned = api.tune(
        model_path,
        dataset,
        b,
        holdout=TUNE_HOLDOUT,
        seed=seed,
        alphas=alphas,
        out=files["tuned"],
        report=files["tune_report"],
        plot=files["tune_plot"],
        max_examples=max_examples,
        device=device,
        progress=step,
    ).report["tune"]
    summary = TuneSummary(
        TUNE_HOLDOUT,
        tuned.n_fit,
        tuned.n_heldout,
        {r.kind: MethodResult(r.heldout.nll, r.heldout.top1, r.alpha, r.heldout.n) for r in tuned.rows},
        {r.kind: MethodResult(r.fit["nll"], r.fit["top1"], r.alpha, tuned.n_fit) for r in tuned.rows},
        tuned.chosen.kind,
        tuned.chosen.label,
        len(tuned.zero_layers),
        len(tuned.layers),
        list(tuned.heldout_indices),
        list(tuned.notes),
    )
    return SampleResult(
        sample.name,
        b,
        len(layers),
        result.n_examples,
        methods,
        (min(alphas_est), max(alphas_est)) if alphas_est else (math.nan, math.nan),
        files,
        None if export is None else export.max_abs_diff,
        summary,
    )


def run_demo(
    out_dir: str | Path = "bncorrect-demo",
    *,
    samples_dir: str | Path | None = None,
    datasets: Sequence[str] = DATASETS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    fast: bool = False,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> DemoResult:
    """Run inspect -> rule -> estimate -> sweep-alpha -> ONNX export -> tune on each sample checkpoint.

    ``fast``: 200 validation examples and a 5-point alpha grid (what the test suite runs)."""
    from .paths import check_paths

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError("the demo's output folder is a file", path=out, hint="pass --out-dir FOLDER")
    samples = Path(samples_dir) if samples_dir is not None else default_samples_dir()
    dirs = _sample_dirs(samples, datasets, batch_sizes)
    check_paths({"samples": samples}, folders={"out_dir": out})
    out.mkdir(parents=True, exist_ok=True)
    demo = DemoResult(out)
    for d in dirs:
        demo.samples.append(
            run_sample(
                d,
                out,
                alphas=list(FAST_ALPHAS) if fast else None,
                max_examples=200 if fast else None,
                device=device,
                seed=seed,
                progress=progress,
            )
        )
    return demo

"""Compare training-side normalization methods at small normalization batches B, with and without post-hoc
correction (issue #7, point 8; in the spirit of Four Things Table 1 and EvalNorm Table 1).

Every network is a sample architecture (:mod:`bncorrect.sample_models`) trained exactly as
``scripts/make_samples.py`` trains the committed samples (same data, initialization per seed, SGD with
Nesterov momentum, cosine schedule, SGD batches of 64, weight decay on conv/linear weights, gradient
clipping, deterministic single-threaded CPU), except for the normalization layers:

- ``bn``: plain ``nn.BatchNorm``; each SGD batch is forwarded in chunks of B (statistics and running-
  statistic updates per chunk; momentum 0.1 per chunk), as make_samples does.
- ``ghost``: :class:`bncorrect.nn.GhostBatchNorm1d/2d` with G = B, the whole SGD batch forwarded at once.
  The normalization, the loss and the gradients are those of ``bn`` (each example normalized with its own
  chunk of B; checked in ``tests/test_compare_methods.py``); what differs is the running-statistic update:
  one update per SGD step with the mean of the 64 / B ghost-batch statistics (``running_update="per_step"``)
  instead of 64 / B sequential updates with momentum 0.1. Trajectories also differ by float summation order
  and, on digits, by how the dropout masks are drawn. So the Ghost-vs-BN difference here measures the
  running-statistic estimate and run-to-run chaos, not Ghost BN's regularization (which is BN at B).
- ``renorm``: :class:`bncorrect.nn.BatchRenorm1d/2d` (Ioffe 2017, moving sigma, update rate 0.01 per chunk),
  chunks of B. The paper's schedule (r_max = 1, d_max = 0 for 5k of 130k steps, r_max -> 3 at 40k,
  d_max -> 5 at 25k, linear) is scaled to the same fractions of this training's forwards (the layers count
  chunks: ``num_batches_tracked``).
- ``bgn``: :class:`bncorrect.nn.BatchGroupNorm1d/2d` (Four Things 3.4), examples per group B, whole SGD batch
  forwarded at once. Channels per group 16 / B in every layer (8 at B = 2, 4 at B = 4), so each statistic
  sees B * 16 / B = 16 channel-examples per position, as many values as BN over 16 examples (the
  "constant number of elements per group" the paper's appendix mentions). Its running statistics are
  moving averages of the channel-group statistics (inference = plain BN with them).
- ``cbn``: :class:`bncorrect.nn.CrossIterationBatchNorm2d` (Yao et al.), chunks of B, window
  k = max(1, 16 // B) forwards (k * B = 16, the paper's rule), burn-in = the first 25% of the training's
  forwards (the paper: 25 of ImageNet's epochs / 3 of COCO's 12). Each chunk forward is one CBN
  iteration, so with 64 / B chunks per SGD step most of the window lies *within* the step, at the same
  weights (compensation exactly zero: pooling k chunks is BN over k * B examples with the older chunks'
  statistics detached); the Taylor compensation only acts across step boundaries. Only Conv -> BN2d pairs
  are converted: on digits the head's rank-2 BatchNorm1d (after a Linear) stays plain chunked BN. The
  layer is 2-D only; the 1-D MNIST-1D net is trained as its exact 2-D twin (Conv1d(k) -> Conv2d((k, 1)),
  BN1d -> BN2d, pool 1d -> 2d on inputs of shape (N, 1, 40, 1); :func:`as_2d` / :func:`from_2d`, equality
  checked in the tests) and mapped back to ``mnist1d_cnn`` afterwards.
- ``gn``: every BN replaced by ``nn.GroupNorm(min(8, C), C)`` (8 groups, the low end of the GroupNorm
  paper's range, as these nets have 16-64 channels); batch-independent, so it is trained once per
  (dataset, seed) with whole SGD batches and shown in every B block; no post-hoc correction applies (n/a).

After training, every BN-family network is converted back to plain ``nn.BatchNorm*d``
(:func:`bncorrect.nn.convert_to_batchnorm`; eval outputs unchanged) and saved as a ``bncorrect/checkpoint-1``
file of the plain architecture. Each validation set is split into fixed halves (first / second, as
``scripts/reproduce.py`` does): the *tuning* half is what the post-hoc tools see, the *test* half is where
every number is measured. Rows per network:

- EMA: plain inference BN with the running statistics;
- best alpha (NLL): :func:`bncorrect.api.sweep_alpha` on the tuning half (train_batch_size = B), the alpha
  with the lowest NLL, then :func:`bncorrect.api.weight` with it;
- EvalNorm offline: :func:`bncorrect.api.estimate` on the tuning half with B = the normalization batch;
- tune: :func:`bncorrect.api.tune` on the tuning half (B = the normalization batch, its own seeded
  stratified split of that half: 70% to fit the candidates, 30% held out to choose among them, seed = the
  network's seed); the correction it writes (``<checkpoint>.tuned.safetensors``, EMA when no candidate
  beat plain BN on its held-out part) applied with :func:`bncorrect.api.apply`. The record keeps which
  candidate it chose (``chosen``: ema, rule, global, evalnorm, evalnorm-recal, tuned) and the NLL of EMA
  and of the chosen one on tune's held-out part.

The post-hoc tools model the training normalization as per-channel statistics over B examples; that is
exact for ``bn`` and ``ghost`` only (Batch Renorm trains with r/d-corrected statistics, BGN with channel-
group statistics, CBN with statistics pooled over k chunks), so for the other methods they are used as the
same off-the-shelf tools, not as the paper's matched corrections.

Usage::

    python scripts/compare_methods.py --jobs 2 --out docs/methods --work /tmp/methods_ckpt

Trained networks are cached in ``--work`` (default ``OUT/checkpoints``): a re-run only evaluates. With
``--merge`` the records already in ``OUT/results.json`` that this run does not recompute are kept (so a grid
can be filled in per dataset, with different seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import make_samples  # noqa: E402

from bncorrect.nn import (  # noqa: E402
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    Ramp,
    convert_to_batchnorm,
    convert_to_cross_iteration,
    convert_to_ghost,
    convert_to_renorm,
)
from bncorrect.nn.convert import replace_modules, transfer_state  # noqa: E402

METHODS: tuple[str, ...] = ("bn", "ghost", "renorm", "bgn", "cbn", "gn")
METHOD_LABELS: dict[str, str] = {
    "bn": "BN (chunks of B)",
    "ghost": "Ghost BN (G = B)",
    "renorm": "Batch Renorm",
    "bgn": "Batch-Group Norm",
    "cbn": "Cross-Iteration BN",
    "gn": "GroupNorm",
}
ROWS: tuple[str, ...] = ("EMA", "best alpha (NLL)", "EvalNorm offline", "tune")
#: Examples each BGN statistic / CBN window covers (in units of examples at one position and channel).
TARGET_EXAMPLES = 16
#: Batch Renorm paper's schedule (sec. 4) as fractions of its 130k training steps.
RENORM_PAPER_STEPS = 130_000
#: CBN burn-in as a fraction of training (paper: 25 epochs on ImageNet, 3 of 12 on COCO).
CBN_BURN_IN_FRACTION = 0.25
GN_GROUPS = 8


# ------------------------------------------------------------------------------------- model building


@dataclass(frozen=True)
class MethodSetup:
    """A built network and how to feed it: ``forward_size`` examples per training forward."""

    model: nn.Module
    forward_size: int
    settings: dict[str, Any]


def total_forwards(n_train: int, B: int, epochs: int, sgd_batch: int = 64) -> int:
    """Training forwards of a chunked run (the step counter of Batch Renorm and CBN layers)."""
    return (n_train // sgd_batch) * epochs * (sgd_batch // B)


def renorm_schedule(forwards: int) -> tuple[Ramp, Ramp]:
    """(r_max, d_max) ramps at the paper's fractions of training (5k/40k and 5k/25k of 130k steps)."""

    def at(steps: int) -> int:
        return round(forwards * steps / RENORM_PAPER_STEPS)

    return Ramp(1.0, 3.0, at(5_000), at(40_000)), Ramp(0.0, 5.0, at(5_000), at(25_000))


def cbn_window(B: int) -> int:
    """CBN window k with k * B = 16 examples (at least 1)."""
    return max(1, TARGET_EXAMPLES // B)


def bgn_channels_per_group(B: int) -> int:
    """Channels per BGN group so that B examples x channels = 16 values per position."""
    return max(1, TARGET_EXAMPLES // B)


class As2d(nn.Sequential):
    """A sequential 1-D net run as its 2-D twin: input (N, C, L) is viewed as (N, C, L, 1)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x.unsqueeze(-1))


def as_2d(model: nn.Sequential) -> As2d:
    """The exact 2-D twin of a 1-D conv net (same parameters, reshaped; same state_dict keys).

    Conv1d(k, stride s, padding p) -> Conv2d((k, 1), (s, 1), (p, 0)); BatchNorm1d on (N, C, L) ->
    BatchNorm2d; AdaptiveAvgPool1d(1) -> AdaptiveAvgPool2d(1). Every other module is kept. ``model`` itself
    is left unchanged (the twin is built from a copy).
    """

    def make(_name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.Conv1d):
            new = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                (m.kernel_size[0], 1),
                stride=(m.stride[0], 1),
                padding=(int(m.padding[0]), 0),  # type: ignore[index]
                dilation=(m.dilation[0], 1),
                groups=m.groups,
                bias=m.bias is not None,
            )
            with torch.no_grad():
                new.weight.copy_(m.weight.unsqueeze(-1))
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            return new
        if type(m) is nn.BatchNorm1d:
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            return transfer_state(m, bn)
        if isinstance(m, nn.AdaptiveAvgPool1d) and m.output_size in (1, (1,)):
            return nn.AdaptiveAvgPool2d(1)
        return None

    root, _ = replace_modules(copy.deepcopy(model), make)
    twin = As2d()
    for name, child in root.named_children():
        twin.add_module(name, child)
    return twin


def from_2d(twin: nn.Module, factory: Callable[[], nn.Module]) -> nn.Module:
    """Load a trained 2-D twin's state into a fresh 1-D ``factory()`` net (tensors reshaped)."""
    model = factory()
    target = model.state_dict()
    state = twin.state_dict()
    if set(state) != set(target):
        raise ValueError(f"state_dict keys differ: {sorted(set(state) ^ set(target))}")
    model.load_state_dict({k: v.reshape(target[k].shape) for k, v in state.items()})
    return model


def _to_batch_group(model: nn.Module, B: int) -> nn.Module:
    """Every plain BN -> Batch-Group Norm with examples_per_group B and 16 / B channels per group."""
    cpg = bgn_channels_per_group(B)

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d):
            return None
        assert isinstance(m, _BatchNorm)
        if m.num_features % cpg:
            raise ValueError(f"{name}: {m.num_features} channels are not a multiple of {cpg}")
        cls = BatchGroupNorm1d if type(m) is nn.BatchNorm1d else BatchGroupNorm2d
        new = cls(m.num_features, m.num_features // cpg, B, m.eps, m.momentum, m.affine, True, "per_step")
        return transfer_state(m, new)

    root, _ = replace_modules(model, make)
    return root


def _to_group_norm(model: nn.Module) -> nn.Module:
    """Every BN -> ``nn.GroupNorm(min(8, C), C)`` with the BN's eps and (fresh) affine parameters."""

    def make(_name: str, m: nn.Module) -> nn.Module | None:
        if not isinstance(m, _BatchNorm):
            return None
        gn = nn.GroupNorm(min(GN_GROUPS, m.num_features), m.num_features, eps=m.eps, affine=m.affine)
        if m.affine:
            with torch.no_grad():
                gn.weight.copy_(m.weight)
                gn.bias.copy_(m.bias)
        return gn

    root, _ = replace_modules(model, make)
    return root


def build_model(dataset: str, method: str, B: int, forwards: int) -> MethodSetup:
    """The sample net of ``dataset`` with ``method``'s normalization (uses the current torch RNG state).

    ``forwards``: the number of training forwards of chunks of B (:func:`total_forwards`), which scales
    Batch Renorm's schedule and CBN's burn-in.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    spec = make_samples.DATASETS[dataset]
    sgd = spec.sgd_batch
    model = spec.factory()
    if method == "bn":
        return MethodSetup(model, B, {"forward": f"chunks of {B}", "momentum": 0.1})
    if method == "ghost":
        model = convert_to_ghost(model, B, running_update="per_step")
        return MethodSetup(
            model,
            sgd,
            {"forward": f"whole SGD batch of {sgd}", "group_size": B, "running_update": "per_step"},
        )
    if method == "renorm":
        r_max, d_max = renorm_schedule(forwards)
        model = convert_to_renorm(model, r_max=r_max, d_max=d_max, momentum=0.01, moving_std=True)
        return MethodSetup(
            model,
            B,
            {
                "forward": f"chunks of {B}",
                "r_max": f"1 up to forward {r_max.begin}, linear to 3 at {r_max.finish}",
                "d_max": f"0 up to forward {d_max.begin}, linear to 5 at {d_max.finish}",
                "momentum": 0.01,
                "total_forwards": forwards,
            },
        )
    if method == "bgn":
        model = _to_batch_group(model, B)
        return MethodSetup(
            model,
            sgd,
            {
                "forward": f"whole SGD batch of {sgd}",
                "examples_per_group": B,
                "channels_per_group": bgn_channels_per_group(B),
                "running_update": "per_step",
            },
        )
    if method == "cbn":
        k = cbn_window(B)
        burn_in = round(CBN_BURN_IN_FRACTION * forwards)
        if dataset == "mnist1d":
            assert isinstance(model, nn.Sequential)
            model = as_2d(model)
        model = convert_to_cross_iteration(model, window=k, burn_in=burn_in)
        return MethodSetup(
            model,
            B,
            {
                "forward": f"chunks of {B}",
                "window": k,
                "burn_in_forwards": burn_in,
                "total_forwards": forwards,
                "as_2d_twin": dataset == "mnist1d",
            },
        )
    model = _to_group_norm(model)
    return MethodSetup(model, sgd, {"forward": f"whole SGD batch of {sgd}", "groups": f"min({GN_GROUPS}, C)"})


def to_plain(model: nn.Module, dataset: str, method: str) -> nn.Module:
    """A trained BN-family network as the plain sample architecture with ``nn.BatchNorm*d`` layers."""
    if method == "bn":
        return model
    if method == "gn":
        raise ValueError("GroupNorm has no BatchNorm form")
    model = convert_to_batchnorm(model)
    if isinstance(model, As2d):
        model = from_2d(model, make_samples.DATASETS[dataset].factory)
    return model


# ------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Run:
    """One training run; GroupNorm runs ignore B (``key`` uses B = 0)."""

    dataset: str
    method: str
    B: int
    seed: int
    epochs: int

    @property
    def key(self) -> str:
        b = 0 if self.method == "gn" else self.B
        return f"{self.dataset}_{self.method}_b{b}_seed{self.seed}_e{self.epochs}"


def train_model(
    run: Run, *, data: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``run`` (single-threaded, deterministic); returns the trained network (plain BN form for the
    BN family) and its training record. ``data``: (x_train, y_train) instead of the dataset's training set.
    """
    spec = make_samples.DATASETS[run.dataset]
    if data is None:
        x_tr, y_tr, *_ = spec.load(0)
    else:
        x_tr, y_tr = data
    b = spec.sgd_batch if run.method == "gn" else run.B
    forwards = total_forwards(len(x_tr), b, run.epochs, spec.sgd_batch)
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(run.seed)
        setup = build_model(run.dataset, run.method, b, forwards)
        gen = torch.Generator().manual_seed(run.seed)
        t0 = time.perf_counter()
        history = make_samples._train_epochs(
            setup.model,
            torch.from_numpy(x_tr),
            torch.from_numpy(y_tr),
            B=b,
            sgd_batch=spec.sgd_batch,
            epochs=run.epochs,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            grad_clip=spec.grad_clip,
            generator=gen,
            forward_size=setup.forward_size,
        )
        seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
    model = setup.model if run.method == "gn" else to_plain(setup.model, run.dataset, run.method)
    record = {
        "train_seconds": round(seconds, 1),
        "train_loss_per_epoch": [round(v, 5) for v in history],
        "settings": setup.settings,
        "n_train": len(x_tr),
    }
    return model.eval(), record


def save_run(path: Path, model: nn.Module, run: Run, record: dict[str, Any]) -> None:
    """Checkpoint (``bncorrect/checkpoint-1`` of the plain architecture; GroupNorm: its own format) and a
    JSON record next to it, each written to a temporary name first."""
    spec = make_samples.DATASETS[run.dataset]
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"train_batch_size": run.B, "dataset": spec.dataset_id, "seed": run.seed, "method": run.method}
    if run.method == "gn":
        ckpt: dict[str, Any] = {"format": "compare_methods/groupnorm", "state_dict": state, "meta": meta}
    else:
        ckpt = {
            "format": make_samples.CHECKPOINT_FORMAT,
            "arch": spec.arch,
            "arch_kwargs": {},
            "state_dict": state,
            "corrections": {},
            "meta": meta,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path.with_suffix(".json"))
    tmp = path.with_suffix(".pt.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def load_group_norm(path: Path, dataset: str) -> nn.Module:
    """A saved GroupNorm network."""
    torch.manual_seed(0)
    model = build_model(dataset, "gn", make_samples.DATASETS[dataset].sgd_batch, 0).model
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model.eval()


# ----------------------------------------------------------------------------------------- evaluation


def write_halves(dataset: str, folder: Path) -> tuple[Path, Path]:
    """Tuning (first half) and test (second half) of the validation set as ``.npz`` files in ``folder``."""
    *_, x_va, y_va, _ = make_samples.DATASETS[dataset].load(0)
    half = len(x_va) // 2
    folder.mkdir(parents=True, exist_ok=True)
    tune, test = folder / f"{dataset}_tune.npz", folder / f"{dataset}_test.npz"
    for path, sl in ((tune, slice(None, half)), (test, slice(half, None))):
        if not path.is_file():
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, x=x_va[sl], y=y_va[sl])
            tmp.replace(path)
    return tune, test


def _metrics(model: nn.Module, test: Path) -> dict[str, float]:
    data = np.load(test)
    return make_samples.evaluate(model, torch.from_numpy(data["x"]), torch.from_numpy(data["y"]))


def tuned_path(path: Path) -> Path:
    """Where :func:`evaluate_run` writes tune's corrections for the checkpoint ``path``."""
    return path.with_name(f"{path.stem}.tuned.safetensors")


def evaluate_run(path: Path, run: Run, tune: Path, test: Path) -> dict[str, dict[str, Any]]:
    """Test-half NLL/top-1 of the rows EMA, best alpha (NLL), EvalNorm offline and tune (GroupNorm: EMA
    only, meaning its plain inference)."""
    import bncorrect
    from bncorrect import api

    torch.set_num_threads(1)
    if run.method == "gn":
        return {"EMA": _metrics(load_group_norm(path, run.dataset), test)}
    rows: dict[str, dict[str, float]] = {"EMA": _metrics(bncorrect.load(path), test)}
    sweep = api.sweep_alpha(path, tune, train_batch_size=run.B, device="cpu").report["sweep"]
    alpha = float(sweep.best_row("nll").alpha)
    rows["best alpha (NLL)"] = {**_metrics(api.weight(path, alpha).model, test), "alpha": alpha}
    est = api.estimate(path, tune, run.B, device="cpu")
    layers = est.report["estimate"].layers
    rows["EvalNorm offline"] = {
        **_metrics(est.model, test),
        "alpha_mean": statistics.fmean(ly.alpha for ly in layers),
        "beta_mean": statistics.fmean(ly.beta for ly in layers),
    }
    out = tuned_path(path)
    out.unlink(missing_ok=True)
    result = api.tune(path, tune, run.B, seed=run.seed, device="cpu", out=out).report["tune"]
    rows["tune"] = {
        **_metrics(api.apply(path, out).model, test),
        "chosen": result.chosen.kind,
        "heldout_ema_nll": result.ema.heldout.nll,
        "heldout_chosen_nll": result.chosen.heldout.nll,
        "n_zero_layers": len(result.zero_layers),
    }
    return rows


def job(run: Run, work: str) -> dict[str, Any]:
    """Train ``run`` into the cache unless it is there, then evaluate it; returns the result record."""
    torch.set_num_threads(1)
    work_dir = Path(work)
    path = work_dir / run.dataset / f"{run.key}.pt"
    trained_now = False
    if not path.is_file():
        model, record = train_model(run)
        save_run(path, model, run, record)
        trained_now = True
    record = json.loads(path.with_suffix(".json").read_text())
    tune, test = write_halves(run.dataset, work_dir / "data")
    t0 = time.perf_counter()
    rows = evaluate_run(path, run, tune, test)
    return {
        "dataset": run.dataset,
        "method": run.method,
        "B": None if run.method == "gn" else run.B,
        "seed": run.seed,
        "epochs": run.epochs,
        **record,
        "trained_now": trained_now,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------- tables


def _mean_sd(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def _err(values: Sequence[float]) -> str:
    errs = [100.0 * (1.0 - v) for v in values]
    mean = statistics.fmean(errs)
    sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def markdown_table(results: list[dict[str, Any]], dataset: str, sizes: Sequence[int]) -> str:
    """Per B and method: test NLL and top-1 error (%) for each row, mean ± sd over seeds."""
    head = (
        "| B | method | seeds | EMA NLL | EMA err % | best α (NLL) NLL | best α err % | α chosen "
        "| EvalNorm NLL | EvalNorm err % | EvalNorm mean α | tune NLL | tune err % | tune chose | train s |"
    )
    lines = [head, "|" + "---|" * 15]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    for b in sizes:
        for m in methods:
            runs = [
                r
                for r in results
                if r["dataset"] == dataset and r["method"] == m and (m == "gn" or r["B"] == b)
            ]
            if not runs:
                continue
            runs.sort(key=lambda r: r["seed"])
            cells = [str(b), METHOD_LABELS[m], ",".join(str(r["seed"]) for r in runs)]
            for row in ROWS:
                have = [r for r in runs if row in r["rows"]]
                if not have:
                    cells += ["n/a", "n/a"] + (["n/a"] if row != "EMA" else [])
                    continue
                # a row measured on fewer seeds than the block (tune, added later) names its seeds
                seeds = "" if len(have) == len(runs) else f" (seeds {','.join(str(r['seed']) for r in have)})"
                cells.append(_mean_sd([r["rows"][row]["nll"] for r in have]) + seeds)
                cells.append(_err([r["rows"][row]["top1"] for r in have]))
                if row == "best alpha (NLL)":
                    cells.append(", ".join(f"{r['rows'][row]['alpha']:g}" for r in have))
                elif row == "EvalNorm offline":
                    cells.append(", ".join(f"{r['rows'][row]['alpha_mean']:.3f}" for r in have))
                elif row == "tune":
                    cells.append(", ".join(str(r["rows"][row]["chosen"]) for r in have))
            cells.append(f"{statistics.fmean(r['train_seconds'] for r in runs):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_table(results: list[dict[str, Any]]) -> str:
    """The per-method settings actually used (one line per method, dataset and B)."""
    seen: dict[tuple[str, str, Any], dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: (r["dataset"], METHODS.index(r["method"]), r["B"] or 0)):
        seen.setdefault((r["dataset"], r["method"], r["B"]), r["settings"])
    lines = ["| dataset | method | B | settings |", "|---|---|---|---|"]
    for (ds, m, b), s in seen.items():
        text = "; ".join(f"{k}: {v}" for k, v in s.items())
        lines.append(f"| {ds} | {METHOD_LABELS[m]} | {'any' if b is None else b} | {text} |")
    return "\n".join(lines)


def merge_results(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``new`` plus every record of ``old`` for a (dataset, method, B, seed, epochs) that ``new`` lacks."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["dataset"], r["method"], r["B"], r["seed"], r["epochs"])

    have = {key(r) for r in new}
    return [*new, *(r for r in old if key(r) not in have)]


def write_outputs(results: list[dict[str, Any]], out: Path) -> str:
    """``results.json`` and ``tables.md`` in ``out``; returns the tables' text."""
    out.mkdir(parents=True, exist_ok=True)
    results = sorted(
        results, key=lambda r: (r["dataset"], r["B"] or 0, METHODS.index(r["method"]), r["seed"])
    )
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    datasets = sorted({r["dataset"] for r in results})
    sizes = sorted({r["B"] for r in results if r["B"] is not None})
    epochs = sorted({r["epochs"] for r in results})
    commands = " and ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", "?") for r in results))
    parts = [
        "# Training-side normalization methods at small B, with and without post-hoc correction\n",
        f"Produced by {commands} (scripts/compare_methods.py; its docstring defines every method). "
        f"Epochs: {', '.join(map(str, epochs))}. Test half of each validation set "
        "(digits 250, MNIST-1D 500 examples); alpha and EvalNorm are fitted on the tuning half. "
        "Cells: mean ± sd over seeds (sample sd; with two seeds a rough spread). "
        "err = top-1 error. GroupNorm is batch-independent: one run per seed, repeated in each B block; "
        "its EMA column is its plain inference, and post-hoc correction does not apply (n/a).",
    ]
    for ds in datasets:
        parts.append(f"\n## {ds}\n\n{markdown_table(results, ds, sizes)}")
    parts.append(f"\n## Settings used\n\n{settings_table(results)}")
    text = "\n".join(parts) + "\n"
    (out / "tables.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------- main


def _cost(run: Run) -> float:
    """Rough relative training cost, to start the longest jobs first."""
    per_b = {"bn": 1.0, "renorm": 1.3, "cbn": 3.0, "ghost": 0.1, "bgn": 0.15, "gn": 0.1}[run.method]
    return (3.0 if run.dataset == "mnist1d" else 1.0) * per_b * run.epochs * (64 / run.B)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="mnist1d,digits")
    parser.add_argument("--batch-sizes", default="2,4")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the samples' epochs per dataset")
    parser.add_argument("--jobs", type=int, default=1, help="processes (each single-threaded)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "methods")
    parser.add_argument("--work", type=Path, default=None, help="checkpoint cache (default OUT/checkpoints)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the records of OUT/results.json that this run does not recompute (e.g. another dataset)",
    )
    args = parser.parse_args(argv)

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for d in datasets:
        if d not in make_samples.DATASETS:
            parser.error(f"unknown dataset {d!r}; choose from {', '.join(make_samples.DATASETS)}")
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if any(b < 2 or 64 % b for b in sizes):
        parser.error("batch sizes must be >= 2 and divide the SGD batch of 64")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs: dict[str, Run] = {}
    for d in datasets:
        epochs = make_samples.DATASETS[d].epochs if args.epochs is None else args.epochs
        for m in methods:
            for b in sizes:
                for s in seeds:
                    run = Run(d, m, b, s, epochs)
                    runs.setdefault(run.key, run)
    work = args.work or args.out / "checkpoints"
    todo = sorted(runs.values(), key=lambda r: (r.seed, -_cost(r)))  # a seed's grid first, longest first
    results: list[dict[str, Any]] = []
    command = "python scripts/compare_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(job, run, str(work)): run for run in todo}
        for fut in as_completed(futures):
            res = {**fut.result(), "command": command.strip()}
            results.append(res)
            ema = res["rows"]["EMA"]
            best = res["rows"].get("best alpha (NLL)")
            extra = "" if best is None else f", best alpha {best['alpha']:g} NLL {best['nll']:.4f}"
            print(
                f"[{time.perf_counter() - t0:6.0f} s] {futures[fut].key}: EMA NLL {ema['nll']:.4f} "
                f"top-1 {ema['top1']:.4f}{extra} (train {res['train_seconds']:.0f} s"
                f"{'' if res['trained_now'] else ', cached'})",
                flush=True,
            )
    if args.merge and (args.out / "results.json").is_file():
        results = merge_results(results, json.loads((args.out / "results.json").read_text()))
    text = write_outputs(results, args.out)
    print(text)
    print(f"wrote {args.out}/results.json and tables.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

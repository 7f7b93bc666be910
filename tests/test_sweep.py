"""sweep-alpha: every candidate's metrics against a straightforward loop (correct_model + F.cross_entropy per
candidate), every evaluation strategy, the report, the plot, the options and the errors."""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect.corrections import Corrections, LayerCorrection
from bncorrect.errors import DataError, NoBatchNormError, UsageError
from bncorrect.layers import CorrectedNorm, correct_model
from bncorrect.sweep import (
    DEFAULT_ALPHAS,
    Candidate,
    alphas_from_options,
    binomial_ci95,
    build_candidates,
    default_alphas,
    parse_alpha_range,
    parse_alphas,
    parse_beta_mode,
    plot_sweep,
    select_output,
    sweep_alpha,
    write_report,
)

from . import toys

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("BNCORRECT_SAMPLES", ROOT / "sample_checkpoints"))
STRATEGIES = [False, True, "auto"]


# ------------------------------------------------------------------------------------------- references
def reference_metrics(model, batches, alpha=0.0, beta=None, stats=None) -> dict[str, float]:
    """Evaluate one candidate the obvious way: a corrected copy, all logits, F.cross_entropy."""
    m = copy.deepcopy(model)
    if stats:
        with torch.no_grad():
            for name, (mean, var) in stats.items():
                m.get_submodule(name).running_mean.copy_(mean)
                m.get_submodule(name).running_var.copy_(var)
    m = correct_model(m, alpha, beta).eval()
    with torch.no_grad():
        logits = torch.cat([m(b[0]) for b in batches])
    y = torch.cat([b[1] for b in batches])
    k = min(5, logits.shape[1])
    return {
        "nll": F.cross_entropy(logits.double(), y).item(),
        "top1": (logits.argmax(1) == y).double().mean().item(),
        "top5": (logits.topk(k, 1).indices == y[:, None]).any(1).double().mean().item(),
    }


def assert_row_matches(row, ref, tol=1e-6):
    assert row.nll == pytest.approx(ref["nll"], abs=tol)
    assert row.top1 == pytest.approx(ref["top1"], abs=1e-12)
    assert row.top5 == pytest.approx(ref["top5"], abs=1e-12)


def split(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


class BNReLU2d(nn.BatchNorm2d):
    """A BN subclass that acts after normalizing: corrected through its own forward (input remapping)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x)) * 2.0


def act_net(seed: int = 0) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        BNReLU2d(4),
        nn.Conv2d(4, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 7),
    )
    return toys._init(model, seed)


class TupleOut(nn.Module):
    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind

    def forward(self, x):
        logits = self.inner(x)
        if self.kind == "tuple":
            return (x.flatten(1)[:, :3], logits)
        return {"aux": x.flatten(1)[:, :3], "logits": logits}


class BatchSizeCaptured(nn.Module):
    """Captures the batch size at the input: fine with plain stacking, breaks the shared prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.net = toys.conv_net(seed=3)

    def forward(self, x):
        b = x.shape[0]
        h = self.net[:9](x)
        return self.net[9:](h.reshape(b, -1))


class MixesExamples(nn.Module):
    """Not row-independent in eval mode (subtracts the batch mean after a BN): stacking must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.net = toys.conv_net(seed=4)

    def forward(self, x):
        h = self.net[:3](x)
        h = h - h.mean(0, keepdim=True)
        return self.net[3:](h)


@pytest.fixture(scope="module")
def data():
    x, y = toys.data(70, seed=5)
    return x, y


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,0.01,0.1", [0.0, 0.01, 0.1]),
        (" 0.5 , 0 ,0.5", [0.0, 0.5]),
        ("1", [1.0]),
        ("1e-3", [0.001]),
    ],
)
def test_parse_alphas(text, expected):
    assert parse_alphas(text) == expected


@pytest.mark.parametrize("text", ["", "0,,0.1", "a,b", "0.1;0.2", "-0.1", "1.5", "nan", "inf", "0,2"])
def test_parse_alphas_rejects_junk(text):
    with pytest.raises(UsageError):
        parse_alphas(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:0.5:11", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]),
        ("0:1:3", [0.0, 0.5, 1.0]),
        ("0.2:0.2:1", [0.2]),
        ("0.1:0.3:2", [0.1, 0.3]),
    ],
)
def test_parse_alpha_range(text, expected):
    assert parse_alpha_range(text) == expected


@pytest.mark.parametrize(
    "text",
    ["0:0.5", "0:0.5:0", "0:0.5:-3", "0:0.5:2.5", "0.5:0:3", "0:1.5:3", "-1:0.5:3", "a:b:3", "0:0.1:1"],
)
def test_parse_alpha_range_rejects_junk(text):
    with pytest.raises(UsageError):
        parse_alpha_range(text)


def test_parse_beta_mode():
    assert parse_beta_mode("equal") == "equal"
    assert parse_beta_mode(" Zero ") == "zero"
    assert parse_beta_mode("0.25") == 0.25
    for bad in ("same", "1.5", "-0.1", "nan"):
        with pytest.raises(UsageError):
            parse_beta_mode(bad)


def test_default_alphas():
    grid = default_alphas()
    assert grid == sorted(DEFAULT_ALPHAS) and grid[0] == 0.0 and max(grid) == 0.5
    assert sum(a <= 0.1 for a in grid) > len(grid) / 2  # dense near 0
    assert 1 / 16 in default_alphas(4) and len(default_alphas(4)) == len(grid) + 1
    assert default_alphas(10) == grid  # 1/100 is already on the grid


def test_alphas_from_options():
    assert alphas_from_options("0.1,0") == [0.0, 0.1]
    assert alphas_from_options(alpha_range="0:1:3") == [0.0, 0.5, 1.0]
    assert alphas_from_options(train_batch_size=4) == default_alphas(4)
    with pytest.raises(UsageError, match="both"):
        alphas_from_options("0", "0:1:3")


@pytest.mark.parametrize(
    ("correct", "n", "lo", "hi"),
    # Wilson score intervals (z = 1.96), textbook values
    [(50, 100, 0.4038, 0.5962), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662)],
)
def test_binomial_ci95(correct, n, lo, hi):
    got = binomial_ci95(correct, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert binomial_ci95(0, 0) == (0.0, 1.0)


def test_build_candidates_merges_and_labels():
    cands = build_candidates([0.0, 0.25, 0.1], train_batch_size=2)
    assert [c.label for c in cands] == ["EMA", "alpha=0.1", "rule 1/B^2 (B=2)"]
    assert [c.kind for c in cands] == ["ema+grid", "grid", "grid+rule"]
    zero = build_candidates([0.0, 0.1], beta_mode="zero", train_batch_size=4)
    assert [(c.alpha_value, c.beta_value) for c in zero] == [(0.0, 0.0), (0.0625, 0.0625), (0.1, 0.0)]
    fixed = build_candidates([0.0], beta_mode=0.5)
    assert [(c.alpha_value, c.beta_value) for c in fixed] == [(0.0, 0.0), (0.0, 0.5)]


# ------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("stack", STRATEGIES)
@pytest.mark.parametrize("make", [toys.conv_net, toys.conv1d_net, act_net], ids=["conv", "conv1d", "bn-act"])
def test_every_row_matches_separate_evaluation(make, stack):
    model = make(seed=1)
    shape = (2, 16) if make is toys.conv1d_net else (3, 8, 8)
    classes = 4 if make is toys.conv1d_net else (7 if make is act_net else 5)
    x, y = toys.data(45, shape, seed=2, classes=classes)
    batches = split(x, y, 16)  # the last batch is shorter
    alphas = [0.0, 0.03, 0.2, 1.0]
    result = sweep_alpha(model, batches, alphas, train_batch_size=4, stack=stack)
    assert result.n_examples == 45 and result.num_classes == classes
    assert [r.alpha for r in result.rows] == [0.0, 0.03, 0.0625, 0.2, 1.0]
    for row in result.rows:
        assert_row_matches(row, reference_metrics(model, batches, row.alpha, row.beta))
    if stack is False:
        assert result.strategy == "sequential"
    elif stack is True:
        assert result.strategy == "stacked+shared-prefix"
    else:  # three batches: stacked, one at a time, stacked (no decision yet)
        assert result.strategy == "stacked+shared-prefix / sequential"


@pytest.mark.parametrize("beta_mode", ["zero", 0.3])
def test_beta_modes_match_separate_evaluation(data, beta_mode):
    x, y = data
    model = toys.conv_net(seed=2)
    batches = split(x, y, 32)
    result = sweep_alpha(model, batches, [0.0, 0.1, 0.5], beta_mode=beta_mode, stack=True)
    for row in result.rows:
        expected_beta = 0.0 if row.label == "EMA" else (0.0 if beta_mode == "zero" else 0.3)
        assert row.beta == expected_beta
        assert_row_matches(row, reference_metrics(model, batches, row.alpha, row.beta))


def test_alpha_zero_only_reproduces_plain_model_exactly(data):
    x, y = data
    model = toys.conv_net(seed=6)
    batches = split(x, y, 32)
    result = sweep_alpha(model, batches, [0.0])
    assert len(result.rows) == 1
    with torch.no_grad():
        logits = torch.cat([model(b[0]) for b in batches])
    row = result.rows[0]
    nll = F.cross_entropy(logits.double(), y, reduction="none")
    assert row.nll == pytest.approx(nll.mean().item(), rel=1e-14, abs=0)
    assert row.top1 * 70 == int((logits.argmax(1) == y).sum())
    assert row.top5 == 1.0  # 5 classes
    assert result.best.alpha == 0.0 and row.nll_diff == 0.0


@pytest.mark.parametrize("stack_rows", [1, 7, 10_000])
def test_chunked_stacking_gives_same_rows(data, stack_rows):
    x, y = data
    model = toys.conv_net(seed=7)
    batches = split(x, y, 35)
    base = sweep_alpha(model, batches, [0.0, 0.1, 0.4], stack=False)
    got = sweep_alpha(model, batches, [0.0, 0.1, 0.4], stack=True, stack_rows=stack_rows)
    assert got.strategy == "stacked+shared-prefix"
    for a, b in zip(base.rows, got.rows, strict=True):
        assert a.nll == pytest.approx(b.nll, abs=1e-6) and a.top1 == b.top1 and a.top5 == b.top5


def test_auto_times_both_modes_then_keeps_one(data):
    x, y = data
    model = toys.conv_net(seed=14)
    batches = split(x, y, 10)  # 7 batches: stacked, one at a time, stacked, one at a time, then the faster
    res = sweep_alpha(model, batches, [0.0, 0.1, 0.3], stack="auto")
    assert res.strategy in ("stacked+shared-prefix", "sequential")
    assert any(n.startswith("auto:") and f"kept {res.strategy}" in n for n in res.strategy_notes)
    for row in res.rows:
        assert_row_matches(row, reference_metrics(model, batches, row.alpha))


def test_stacking_falls_back_when_rows_are_not_independent(data):
    x, y = data
    batches = split(x, y, 32)
    captured = BatchSizeCaptured().eval()
    res = sweep_alpha(captured, batches, [0.0, 0.2], stack=True)
    assert res.strategy == "stacked" and any("shared-prefix not used" in n for n in res.strategy_notes)
    for row in res.rows:
        assert_row_matches(row, reference_metrics(captured, batches, row.alpha))
    mixing = MixesExamples().eval()
    res = sweep_alpha(mixing, batches, [0.0, 0.2], stack=True)
    assert res.strategy == "sequential"
    for row in res.rows:
        assert_row_matches(row, reference_metrics(mixing, batches, row.alpha))


def test_extra_candidates_per_layer_and_recalibrated_statistics(data):
    x, y = data
    model = toys.conv_net(seed=8)
    batches = split(x, y, 32)
    alpha = {"1": 0.3, "5": torch.linspace(0.0, 0.5, 8), "10": 0.1}
    beta = {"1": 0.2, "5": 0.05, "10": 0.0}
    g = torch.Generator().manual_seed(0)
    stats = {"5": (torch.randn(8, generator=g) * 0.2, torch.rand(8, generator=g) + 0.7)}
    corr = Corrections(
        {n: LayerCorrection(torch.tensor(0.15), torch.tensor(0.1)) for n in ("1", "5", "10")},
        "evalnorm-offline",
    )
    extra = [
        Candidate("per-layer", alpha, beta),
        Candidate("recalibrated", 0.05, None, stats),
        Candidate.from_corrections(corr, "evalnorm-offline (file.safetensors)"),
    ]
    for stack in (False, True):
        res = sweep_alpha(model, batches, [0.0, 0.1], extra_candidates=extra, stack=stack)
        rows = {r.label: r for r in res.rows}
        assert list(rows) == [
            "EMA",
            "alpha=0.1",
            "per-layer",
            "recalibrated",
            "evalnorm-offline (file.safetensors)",
        ]
        assert_row_matches(rows["per-layer"], reference_metrics(model, batches, alpha, beta))
        assert_row_matches(rows["recalibrated"], reference_metrics(model, batches, 0.05, None, stats))
        assert_row_matches(
            rows["evalnorm-offline (file.safetensors)"], reference_metrics(model, batches, 0.15, 0.1)
        )
        assert rows["per-layer"].alpha is None and rows["recalibrated"].alpha is None
        assert res.best.alpha is not None  # the choice is among global alphas


def test_model_is_not_modified(data):
    x, y = data
    model = toys.conv_net(seed=9).train()
    before = copy.deepcopy(model.state_dict())
    sweep_alpha(
        model,
        split(x, y, 32),
        [0.0, 0.3],
        extra_candidates=[Candidate("s", 0.1, None, {"1": (torch.zeros(6), torch.ones(6))})],
    )
    assert model.training and all(m.training for m in model.modules())
    assert not any(isinstance(m, CorrectedNorm) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_already_corrected_model_is_swept_from_plain_bn(data):
    x, y = data
    model = toys.conv_net(seed=10)
    corrected = correct_model(copy.deepcopy(model), 0.4)
    batches = split(x, y, 32)
    res = sweep_alpha(corrected, batches, [0.0, 0.2])
    for row in res.rows:
        assert_row_matches(row, reference_metrics(model, batches, row.alpha))
    assert float(corrected.get_submodule("1").alpha) == pytest.approx(0.4)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_and_dict_outputs(data, kind):
    x, y = data
    inner = toys.conv_net(seed=11)
    model = TupleOut(inner, kind)
    batches = split(x, y, 32)
    key = 1 if kind == "tuple" else "logits"
    res = sweep_alpha(model, batches, [0.0, 0.2], output_key=key)
    assert res.strategy.startswith("stacked")
    for row in res.rows:
        assert_row_matches(row, reference_metrics(inner, batches, row.alpha))
    with pytest.raises(UsageError, match="output-key"):
        sweep_alpha(model, batches, [0.0, 0.2])
    with pytest.raises(UsageError):
        sweep_alpha(model, batches, [0.0], output_key=5 if kind == "tuple" else "nope")


def test_select_output():
    t = torch.zeros(2, 3)
    assert select_output(t) is t
    assert select_output((1, t), 1) is t and select_output([t], "0") is t
    assert select_output({"logits": t, "n": 3}) is t  # the only tensor
    with pytest.raises(UsageError):
        select_output(t, "logits")
    with pytest.raises(UsageError):
        select_output({"a": t, "b": t})
    with pytest.raises(UsageError):
        select_output((t, 3), 1)


def test_progress_and_forward_fn(data):
    x, y = data
    model = toys.conv_net(seed=12)
    calls = []
    batches = [(x[i : i + 32] * 0.5, y[i : i + 32]) for i in range(0, 70, 32)]
    res = sweep_alpha(
        model,
        [(x[i : i + 32], y[i : i + 32]) for i in range(0, 70, 32)],
        [0.0, 0.1],
        forward_fn=lambda m, b: m(b[0] * 0.5),
        progress=lambda d, done, total: calls.append((d, done, total)),
        total_examples=70,
    )
    assert calls[-1] == ("sweep-alpha", 70, 70) and [c[1] for c in calls] == [32, 64, 70]
    for row in res.rows:
        assert_row_matches(row, reference_metrics(model, batches, row.alpha))


# ------------------------------------------------------------------------------------------- errors
def test_missing_labels(data):
    x, _ = data
    with pytest.raises(DataError, match="no labels") as err:
        sweep_alpha(toys.conv_net(), [(x,)], [0.0], data_hint="images/")
    assert "images/" in str(err.value) and "sub-folder per class" in str(err.value)


@pytest.mark.parametrize("where", ["first", "later"])
def test_labels_outside_output_range(data, where):
    x, y = data
    y = y.clone()
    y[3 if where == "first" else 60] = 5  # conv_net has 5 outputs
    with pytest.raises(DataError, match="outside the model's output range") as err:
        sweep_alpha(toys.conv_net(), split(x, y, 32), [0.0, 0.1], data_hint="val.npz")
    assert "val.npz" in str(err.value) and "5 class scores" in str(err.value)


def test_other_errors(data):
    x, y = data
    batches = split(x, y, 32)
    with pytest.raises(UsageError):
        sweep_alpha(toys.conv_net(), batches, [0.0, 1.5])
    with pytest.raises(UsageError):
        sweep_alpha(toys.conv_net(), batches, [0.0], metric="accuracy")
    with pytest.raises(UsageError):
        sweep_alpha(toys.conv_net(), batches, [0.0], stack="yes")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        sweep_alpha(toys.conv_net(), batches, [0.0], stack_rows=0)
    with pytest.raises(UsageError, match="does not have"):
        sweep_alpha(toys.conv_net(), batches, [0.0], extra_candidates=[Candidate("bad", {"nope": 0.1})])
    with pytest.raises(UsageError):
        sweep_alpha(
            toys.conv_net(), batches, [0.0], extra_candidates=[Candidate("bad", {"1": torch.zeros(3)})]
        )
    with pytest.raises(DataError, match="no examples"):
        sweep_alpha(toys.conv_net(), [], [0.0])
    with pytest.raises(NoBatchNormError):
        sweep_alpha(toys.no_bn_net(), batches, [0.0])
    with pytest.raises(DataError, match="failed on a data batch"):
        sweep_alpha(toys.conv_net(), [(torch.zeros(4, 2, 8, 8), torch.zeros(4, dtype=torch.long))], [0.0])


# ------------------------------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def result():
    x, y = toys.data(90, seed=13)
    return sweep_alpha(toys.conv_net(seed=13), split(x, y, 32), [0.0, 0.05, 0.2, 0.5], train_batch_size=4)


def test_best_rows_are_the_optima(result):
    glob = [r for r in result.rows if r.alpha is not None]
    assert result.best_row("nll").nll == min(r.nll for r in glob)
    assert result.best_row("top1").top1 == max(r.top1 for r in glob)
    assert result.best_row("top5").top5 == max(r.top5 for r in glob)
    assert result.best is result.best_row("nll")
    ema = result.ema
    for r in result.rows:
        assert r.nll_diff == pytest.approx(r.nll - ema.nll, abs=1e-12)
        assert r.top1_diff == pytest.approx(r.top1 - ema.top1, abs=1e-12)
        lo, hi = r.top1_ci95
        assert lo <= r.top1 <= hi


def test_json_report_matches_table(result, tmp_path):
    from rich.console import Console

    path = write_report(result, tmp_path / "sweep.json")
    report = json.loads(path.read_text())
    assert {"metric", "n_examples", "best", "rows"} <= report.keys()
    assert report["metric"] == "nll" and report["n_examples"] == 90
    assert {"alpha", "nll", "top1", "top5"} <= report["best"].keys()
    assert report["best"]["alpha"] == result.best.alpha
    assert report["best"] == report["best_by_metric"]["nll"]
    console = Console(record=True, width=200)
    console.print(result.table())
    text = console.export_text()
    lines = {
        ln.split("│")[2].strip() + "|" + ln.split("│")[3].strip(): ln
        for ln in text.splitlines()
        if ln.count("│") > 5
    }
    assert len(report["rows"]) == len(result.rows) == len(lines)
    for jrow, row in zip(report["rows"], result.rows, strict=True):
        assert {"alpha", "nll", "top1", "top5", "label", "top1_ci95"} <= jrow.keys()
        assert (jrow["alpha"], jrow["nll"], jrow["top1"], jrow["top5"]) == (
            row.alpha,
            row.nll,
            row.top1,
            row.top5,
        )
        label = "" if jrow["label"].startswith("alpha=") else jrow["label"]
        line = lines[f"{label}|{jrow['alpha']:.4g}"]
        assert f"{jrow['nll']:.4f}" in line and f"{100 * jrow['top1']:.2f}" in line
        assert f"{100 * jrow['top5']:.2f}" in line
        assert ("◀" in line) == (jrow == report["best"])
    assert "90 labelled examples" in text


@pytest.mark.parametrize(("size", "dpi"), [((8.0, 8.0), 100), ((6.0, 4.5), 80)])
def test_plot_is_a_png_of_the_expected_size(result, tmp_path, size, dpi):
    out = plot_sweep(result, tmp_path / "sweep.png", size=size, dpi=dpi)
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == (round(size[0] * dpi), round(size[1] * dpi))
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]  # no temporary file left


def test_outputs_refuse_a_missing_folder(result, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        plot_sweep(result, tmp_path / "nope" / "sweep.png")
    with pytest.raises(UsageError, match="does not exist"):
        write_report(result, tmp_path / "nope" / "sweep.json")


# ------------------------------------------------------------------------------------------- samples
def _sample(name: str):
    folder = SAMPLES / name  # committed; rebuilt by scripts/make_samples.py
    from bncorrect.data import load_data, make_loader
    from bncorrect.models import load_model

    model = load_model(folder / "model.pt").model
    dataset = load_data(folder / "val.npz")
    return model, list(make_loader(dataset, 256)), len(dataset)


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_small_batch_sample_prefers_positive_alpha(dataset):
    model, batches, n = _sample(f"{dataset}_b2")
    res = sweep_alpha(model, batches, [0.0, 0.05, 0.1, 0.2], train_batch_size=2)
    assert res.n_examples == n
    best = res.best_row("nll")
    assert best.alpha > 0 and best.nll < res.ema.nll
    assert_row_matches(best, reference_metrics(model, batches, best.alpha))


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_large_batch_sample_optimum_near_zero(dataset):
    model, batches, _ = _sample(f"{dataset}_b32")
    res = sweep_alpha(model, batches, [0.0, 0.01, 0.02, 0.05, 0.1, 0.2], train_batch_size=32)
    best = res.best_row("nll")
    assert best.alpha <= 0.02
    assert best.nll <= res.ema.nll and res.ema.nll - best.nll < 0.02 * res.ema.nll
    assert math.isfinite(best.nll)
    assert np.isclose(res.rows[0].nll, reference_metrics(model, batches)["nll"], atol=1e-6)

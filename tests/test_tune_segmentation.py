"""tune on segmentation: every candidate's held-out pixel-nll, mIoU and pixel accuracy against a direct
computation (a corrected copy of the model, plain torch cross_entropy with ignore_index, a numpy confusion
matrix), the written model reproducing the chosen row, the per-image split, the choice by each metric, the
guard, the pixel loss of the per-layer fit, the CLI end to end on a mask file, and bad masks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncorrect
from bncorrect import api, load_corrections
from bncorrect.errors import DataError, UsageError
from bncorrect.layers import correct_model
from bncorrect.tune import PixelLoss, fit_per_layer, random_split

from . import toys

TOYS = Path(__file__).resolve().parent / "toys.py"
K = 4
IGNORE = 255


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return (out["out"] if isinstance(out, dict) else out).double()


def sampled_masks(model: nn.Module, x: torch.Tensor, seed: int, alpha=0.0, ignore_frac: float = 0.15):
    """Masks drawn pixel by pixel from the model's own predictive distribution with the given correction,
    some pixels (and the first row) marked IGNORE."""
    m = correct_model(copy.deepcopy(model), alpha).eval()
    probs = torch.softmax(_logits(m, x), 1)  # (N, K, H, W)
    g = torch.Generator().manual_seed(seed)
    flat = probs.movedim(1, -1).reshape(-1, probs.shape[1])
    y = torch.multinomial(flat, 1, generator=g).reshape(probs.shape[0], *probs.shape[2:])
    y[torch.rand(y.shape, generator=g) < ignore_frac] = IGNORE
    y[:, 0, :] = IGNORE
    return y


def direct_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ignore: int = IGNORE) -> dict:
    """pixel-nll with torch's own ignore_index, pixel accuracy and mIoU from a numpy confusion matrix over the
    labelled pixels (IoU over the classes present in the targets or the predictions)."""
    logits = _logits(model, x)
    nll = float(F.cross_entropy(logits, y, ignore_index=ignore))
    pred = logits.argmax(1).numpy().reshape(-1)
    target = y.numpy().reshape(-1)
    keep = target != ignore
    c = logits.shape[1]
    cm = np.bincount(target[keep] * c + pred[keep], minlength=c * c).reshape(c, c)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    return {
        "pixel-nll": nll,
        "miou": float((tp[present] / union[present]).mean()),
        "pixel-acc": float(tp.sum() / keep.sum()),
    }


def candidate_model(model: nn.Module, result, kind: str) -> nn.Module:
    """The candidate applied by hand: its statistics (if any) in the buffers, its coefficients."""
    base = copy.deepcopy(model)
    stats = result.running_stats(kind)
    if stats is not None:
        with torch.no_grad():
            for name, (mean, var) in stats.items():
                base.get_submodule(name).running_mean.copy_(mean)
                base.get_submodule(name).running_var.copy_(var)
    coeffs = result.coefficients(kind)
    alpha = {n: a for n, (a, _) in coeffs.items()}
    beta = {n: b for n, (_, b) in coeffs.items()}
    return correct_model(base, alpha, beta).eval()


@pytest.fixture(scope="module")
def case():
    """seg_net with masks drawn from it corrected with alpha = 0.3 (so correcting helps)."""
    model = toys.seg_net(seed=2)
    x, _ = toys.seg_data(90, seed=3)
    y = sampled_masks(model, x, seed=4, alpha=0.3)
    return model, x, y


# ------------------------------------------------------------------------------------------- the numbers
def test_every_candidate_against_a_direct_computation_and_the_written_model(case, tmp_path):
    model, x, y = case
    out = tmp_path / "tuned.pt"
    weights = tmp_path / "seg.pt"
    torch.save(model.state_dict(), weights)
    arch = f"{TOYS}:seg_net"
    result = api.tune(
        weights, (x, y), 2, arch=arch, metric="miou", holdout=0.4, seed=1, device="cpu", max_epochs=4, out=out
    ).report["tune"]  # fmt: skip
    assert result.task == "segmentation" and result.metric == "miou" and result.ignore_index == IGNORE
    kinds = [r.kind for r in result.rows]
    assert kinds == ["ema", "rule", "global", "evalnorm", "evalnorm-recal", "tuned"]
    held, fit = torch.tensor(result.heldout_indices), torch.tensor(result.fit_indices)
    # the split: seeded per image, disjoint, round(0.4 * 90) held out
    assert len(held) == 36 and len(fit) == 54 and not set(held.tolist()) & set(fit.tolist())
    assert torch.equal(random_split(90, 0.4, 1)[1], held)
    for row in result.rows:
        corrected = candidate_model(model, result, row.kind)
        want = direct_metrics(corrected, x[held], y[held])
        h = row.heldout
        assert h.value("pixel-nll") == pytest.approx(want["pixel-nll"], abs=1e-5), row.kind
        assert h.value("miou") == pytest.approx(want["miou"], abs=1e-9), row.kind
        assert h.value("pixel-acc") == pytest.approx(want["pixel-acc"], abs=1e-9), row.kind
        assert h.n_pixels == int((y[held] != IGNORE).sum())
        on_fit = direct_metrics(corrected, x[fit], y[fit])
        for metric in ("pixel-nll", "miou", "pixel-acc"):
            assert row.value(metric, "fit") == pytest.approx(on_fit[metric], abs=1e-5), (row.kind, metric)
    # the choice: the best held-out mIoU (ties to the simpler candidate), never below EMA's
    best = max(r.heldout.value("miou") for r in result.rows)
    assert result.chosen.heldout.value("miou") == best >= result.ema.heldout.value("miou")
    assert result.chosen.kind != "ema"  # masks drawn from a corrected model: a correction wins here
    # what was written, loaded as a user would, reproduces the chosen row
    written = bncorrect.load(out, arch=arch).eval()
    got = direct_metrics(written, x[held], y[held])
    assert got["miou"] == pytest.approx(result.chosen.heldout.value("miou"), abs=1e-9)
    assert got["pixel-nll"] == pytest.approx(result.chosen.heldout.value("pixel-nll"), abs=1e-5)
    report = result.as_report()
    assert report["task"] == "segmentation" and report["ignore_index"] == IGNORE
    assert "miou_convention" in report
    for jrow in report["rows"]:
        assert {"pixel_nll", "pixel_acc", "miou", "iou_per_class", "n_pixels"} <= set(jrow["heldout"])
        assert set(jrow["fit"]) == {"pixel-nll", "miou", "pixel-acc"}


@pytest.mark.parametrize("metric", ["pixel-nll", "pixel-acc", "nll"])
def test_choice_by_each_metric(case, metric):
    model, x, y = case
    result = api.tune(model, (x, y), 2, metric=metric, holdout=0.4, seed=1, device="cpu", max_epochs=2,
                      recalibrate=False).report["tune"]  # fmt: skip
    chosen = "pixel-nll" if metric == "nll" else metric
    assert result.metric == chosen
    values = [r.heldout.value(chosen) for r in result.rows]
    best = min(values) if chosen == "pixel-nll" else max(values)
    assert result.chosen.heldout.value(chosen) == best
    ema = result.ema.heldout.value(chosen)
    assert best <= ema if chosen == "pixel-nll" else best >= ema


def test_guard_writes_ema_when_the_fit_overfits(tmp_path):
    """Masks drawn from plain BN's own predictions and a fitting part of 12 images: the corrections fitted
    there are no better than EMA on the 108 held-out images by pixel-nll, so EMA is written."""
    model = toys.seg_net(seed=5)
    x, _ = toys.seg_data(120, seed=6)
    y = sampled_masks(model, x, seed=7)
    out = tmp_path / "guarded.safetensors"
    result = api.tune(model, (x, y), 2, holdout=0.9, device="cpu", out=out, max_epochs=15).report["tune"]
    assert (result.n_fit, result.n_heldout) == (12, 108)
    assert result.chosen.kind == "ema"
    ema = result.ema.heldout.value("pixel-nll")
    assert all(r.heldout.value("pixel-nll") >= ema for r in result.rows)
    assert any("EMA written" in note for note in result.notes)
    corr = load_corrections(out)
    assert all(float(lc.alpha) == float(lc.beta) == 0.0 for lc in corr.layers.values())
    assert all(lc.running_mean is None for lc in corr.layers.values())


# ------------------------------------------------------------------------------------------- the fit's loss
def test_pixel_loss_is_torch_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, K, 6, 7, generator=g, dtype=torch.float64)  # 3 sets, 5 masks
    y = torch.randint(0, K, (5, 6, 7), generator=g)
    y[torch.rand(5, 6, 7, generator=g) < 0.3] = IGNORE
    sums, count = PixelLoss(IGNORE)(logits, y)
    assert int(count) == int((y != IGNORE).sum())
    for j in range(3):
        want = F.cross_entropy(logits[j], y, ignore_index=IGNORE, reduction="sum")
        assert float(sums[j]) == pytest.approx(float(want), rel=1e-12)


def test_fit_on_masks_stacked_equals_one_strength_at_a_time(case):
    """The per-layer fit with the pixel loss: K strengths stacked give what K separate fits give, and the
    monitor NLL it reports is the mean pixel cross-entropy of the returned coefficients."""
    model, x, y = case
    batches = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 60, 30)]
    monitor = [(x[60:], y[60:])]
    kw = dict(init_alpha=0.1, strengths=(0.0, 0.05), lr=0.05, max_epochs=4, device="cpu", loss_fn=PixelLoss())
    stacked = fit_per_layer(model, batches, monitor, **kw)
    alone = fit_per_layer(model, batches, monitor, stack=False, **kw)
    assert stacked.mode.startswith("stacked") and stacked.best.epoch > 0
    for a, b in zip(stacked.fits, alone.fits, strict=True):
        assert a.monitor_nll == pytest.approx(b.monitor_nll, abs=1e-6)
        for name in a.alpha:
            assert float(a.alpha[name]) == pytest.approx(float(b.alpha[name]), abs=1e-4)
            assert float(a.beta[name]) == pytest.approx(float(b.beta[name]), abs=1e-4)
    best = stacked.best
    fitted = correct_model(copy.deepcopy(model), best.alpha, best.beta).eval()
    want = float(F.cross_entropy(_logits(fitted, x[60:]), y[60:], ignore_index=IGNORE))
    assert best.monitor_nll == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def seg_files(tmp_path):
    model = toys.seg_dict_net(seed=1)
    x, _ = toys.seg_data(60, seed=8)
    y = sampled_masks(model, x, seed=9, alpha=0.2)
    weights = tmp_path / "seg.pt"
    torch.save(model.state_dict(), weights)
    data = tmp_path / "val.npz"
    np.savez(data, x=x.numpy(), y=y.numpy().astype(np.uint8))
    return {"model": model, "x": x, "y": y, "weights": weights, "data": data, "dir": tmp_path,
            "load": ("--arch", f"{TOYS}:seg_dict_net")}  # fmt: skip


def test_cli_segmentation_end_to_end(cli, seg_files):
    d = seg_files["dir"]
    out, report, plot = d / "tuned.safetensors", d / "tune.json", d / "tune.png"
    base = ["tune", seg_files["weights"], *seg_files["load"], "--data", seg_files["data"], "-B", 2,
            "--output-key", "out", "--max-epochs", 3, "--device", "cpu"]  # fmt: skip
    res = cli(*base, "--metric", "miou", "-o", out, "--report", report, "--plot", plot, "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    saved = json.loads(report.read_text())
    assert data["output"] == str(out)
    for rep in (data, saved):
        assert rep["task"] == "segmentation" and rep["metric"] == "miou" and rep["ignore_index"] == IGNORE
        assert {"metric", "n_examples", "n_fit", "n_heldout", "chosen", "rows", "layers", "notes"} <= set(rep)
    assert data["n_heldout"] == 18  # round(0.3 * 60) images held out
    # the written corrections, applied by hand to the model, reproduce the chosen row on the held-out images
    result_rows = {r["kind"]: r for r in saved["rows"]}
    chosen = saved["chosen"]
    assert chosen["heldout"]["miou"] == max(r["heldout"]["miou"] for r in result_rows.values())
    corr = load_corrections(out)
    assert corr.method.startswith(f"tune ({chosen['kind']}")
    base_model = copy.deepcopy(seg_files["model"])
    if chosen["recalibrated"]:
        with torch.no_grad():
            for name, lc in corr.layers.items():
                base_model.get_submodule(name).running_mean.copy_(lc.running_mean)
                base_model.get_submodule(name).running_var.copy_(lc.running_var)
    alpha = {n: lc.alpha for n, lc in corr.layers.items()}
    beta = {n: lc.beta for n, lc in corr.layers.items()}
    corrected = correct_model(base_model, alpha, beta).eval()
    split = random_split(60, 0.3, 0)[1]
    got = direct_metrics(corrected, seg_files["x"][split], seg_files["y"][split])
    assert got["miou"] == pytest.approx(chosen["heldout"]["miou"], abs=1e-9)
    assert got["pixel-nll"] == pytest.approx(chosen["heldout"]["pixel_nll"], abs=1e-5)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table for people
    res = cli(*base, "--no-recalibrate", "--max-epochs", 1)
    assert res.code == 0, res.err
    assert "mIoU" in res.out and "pixel-nll" in res.out and "Chosen by held-out pixel-nll" in res.out


def test_bad_masks_and_options_are_refused_before_anything_is_written(cli, seg_files):
    d = seg_files["dir"]
    y = seg_files["y"].clone()
    y[3, 4, 4] = 9
    bad = d / "bad.npz"
    np.savez(bad, x=seg_files["x"].numpy(), y=y.numpy())
    out = d / "o.safetensors"
    base = ["tune", seg_files["weights"], *seg_files["load"], "-B", 2, "--device", "cpu", "-o", out]
    calls: list[tuple] = []
    res = cli(*base, "--data", bad, "--output-key", "out")
    assert res.code != 0 and "bad.npz" in res.err and "mask value 9" in res.err
    assert "--ignore-index 9" in res.err
    assert "Traceback" not in res.err and not out.exists()
    res = cli(*base, "--data", seg_files["data"], "--output-key", "out", "--metric", "top1")
    assert res.code != 0 and "--metric top1" in res.err and "miou" in res.err and not out.exists()
    res = cli(*base, "--data", seg_files["data"])  # a dict of two maps: which one?
    assert res.code != 0 and "--output-key out" in res.err and not out.exists()
    onnx_out = d / "o.onnx"
    budget = ("--output-key", "out", "--latency-budget", 1.3)
    res = cli(*base[:-1], onnx_out, "--data", seg_files["data"], *budget)
    assert res.code != 0 and "--latency-budget" in res.err and "segmentation" in res.err
    assert not onnx_out.exists()
    # the library: the same error, raised before any pass (no progress reported)
    with pytest.raises(DataError, match="mask value 9"):
        api.tune(seg_files["model"], (seg_files["x"], y), 2, output_key="out", device="cpu",
                 progress=lambda *a: calls.append(a))  # fmt: skip
    assert calls == []
    with pytest.raises(UsageError, match="classification metric"):
        api.tune(seg_files["model"], (seg_files["x"], seg_files["y"]), 2, output_key="out", metric="top5",
                 device="cpu")  # fmt: skip

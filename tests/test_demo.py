"""`bncorrect demo` end to end on the digits samples (fast path), checked against direct computations."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bncorrect
from bncorrect.demo import METHODS

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
N_FAST = 200


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from bncorrect.cli import main

    out = tmp_path_factory.mktemp("demo")
    report = out / "stdout.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--fast", "--dataset", "digits", "--out-dir", str(out), "--json"])
    report.write_text(buf.getvalue())
    return code, json.loads(buf.getvalue()) if code == 0 else None, out


def _val(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(SAMPLES / name / "val.npz")
    return torch.from_numpy(data["x"][:n]), torch.from_numpy(data["y"][:n])


def _metrics(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    return float(F.cross_entropy(logits.double(), y)), float((logits.argmax(1) == y).double().mean())


def test_demo_runs_both_batch_sizes_and_writes_its_files(demo_run):
    code, data, out = demo_run
    assert code == 0
    assert [s["name"] for s in data["samples"]] == ["digits_b2", "digits_b32"]
    for s in data["samples"]:
        assert set(s["methods"]) == set(METHODS)
        files = {k: Path(v) for k, v in s["files"].items()}
        assert all(p.parent == out / s["name"] for p in files.values())
        assert files["sweep_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        onnx.checker.check_model(onnx.load(files["onnx"]), full_check=True)
        assert s["onnx_max_abs_diff"] < 1e-4
        report = json.loads(files["sweep_report"].read_text())
        assert report["n_examples"] == N_FAST == s["n_examples"]
        assert report["best"]["nll"] == pytest.approx(s["methods"]["best global alpha (NLL)"]["nll"])


def test_demo_ema_and_rule_rows_match_direct_evaluation(demo_run):
    _, data, _ = demo_run
    for s in data["samples"]:
        x, y = _val(s["name"], N_FAST)
        model = bncorrect.load(SAMPLES / s["name"] / "model.pt")
        with torch.no_grad():
            nll, top1 = _metrics(model(x), y)
        assert s["methods"]["EMA (plain BN)"]["nll"] == pytest.approx(nll, abs=1e-6)
        assert s["methods"]["EMA (plain BN)"]["top1"] == pytest.approx(top1)
        rule = bncorrect.load(SAMPLES / s["name"] / "model.pt")
        bncorrect.correct_model(rule, 1.0 / s["train_batch_size"] ** 2)
        with torch.no_grad():
            nll, _ = _metrics(rule(x), y)
        assert s["methods"]["rule 1/B^2"]["nll"] == pytest.approx(nll, abs=1e-6)


def test_demo_training_mode_reference_matches_plain_train_mode_bn(demo_run):
    """The reference row equals the model with its BN modules in train mode (momentum 0: running statistics
    untouched), dropout in eval, forwarded in consecutive chunks of B."""
    _, data, _ = demo_run
    for s in data["samples"]:
        b = s["train_batch_size"]
        x, y = _val(s["name"], N_FAST)
        keep = len(x) - len(x) % b
        model = copy.deepcopy(bncorrect.load(SAMPLES / s["name"] / "model.pt")).eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0
        with torch.no_grad():
            logits = torch.cat([model(x[i : i + b]) for i in range(0, keep, b)])
        nll, top1 = _metrics(logits, y[:keep])
        ref = s["methods"]["train-mode BN, groups of B"]
        assert ref["n"] == keep
        assert ref["nll"] == pytest.approx(nll, abs=1e-6)
        assert ref["top1"] == pytest.approx(top1)


def test_demo_shows_the_papers_effect_at_b2_but_not_b32(demo_run):
    _, data, _ = demo_run
    b2, b32 = data["samples"]
    assert b2["methods"]["best global alpha (NLL)"]["alpha"] > 0
    assert b2["methods"]["EvalNorm offline"]["nll"] < b2["methods"]["EMA (plain BN)"]["nll"]
    assert b32["methods"]["best global alpha (NLL)"]["alpha"] <= 0.05


def test_demo_table_in_text_mode(tmp_path, cli):
    res = cli("demo", "--fast", "--dataset", "digits", "-B", 2, "--out-dir", tmp_path / "d")
    assert res.code == 0, res.err
    for method in METHODS:
        assert method in res.out
    assert "digits_b2" in res.out and "digits_b32" not in res.out and "corrected.onnx" in res.err
    assert "held-out half" in res.out and "tuned per layer" in res.out and "◀" in res.out
    assert "tune wrote" in res.out and (tmp_path / "d" / "digits_b2" / "tuned.safetensors").is_file()
    wrote = next(line for line in res.out.splitlines() if "tune wrote" in line)
    # the count of plain layers is about the per-layer fit: said only when that is what was written
    assert ("per-layer fit leaves" in wrote) <= ("tuned per layer" in wrote)


def test_demo_without_samples_says_where_to_get_them(tmp_path, cli):
    res = cli("demo", "--samples", tmp_path / "nowhere", "--out-dir", tmp_path / "d")
    assert res.code != 0
    assert "make_samples.py" in res.err and "Traceback" not in res.err
    res = cli("demo", "--dataset", "imagenet", "--out-dir", tmp_path / "d")
    assert res.code == 2 and "digits, mnist1d" in res.err
    res = cli("demo", "-B", 4, "--out-dir", tmp_path / "d")
    assert res.code != 0 and "digits_b4" in res.err and "--batch-sizes 4" in res.err
    assert not (tmp_path / "d").exists()  # nothing written when the samples are not all there


def test_demo_tune_rows_are_held_out_numbers_of_what_it_wrote(demo_run):
    """The demo's tune table: every candidate scored on the held-out half; the written file, applied to the
    model and evaluated directly on those examples, gives the chosen row's number, and plain BN there gives
    the EMA row's. The held-out half is a stratified half of the examples tune used, disjoint from the
    rest."""
    from bncorrect.demo import TUNE_ROWS

    _, data, _ = demo_run
    for s in data["samples"]:
        t = s["tune"]
        assert set(t["heldout"]) == {kind for kind, _ in TUNE_ROWS} == set(t["fit"])
        assert t["holdout"] == 0.5 and t["n_fit"] + t["n_heldout"] == N_FAST and t["n_heldout"] == N_FAST // 2
        idx = torch.tensor(t["heldout_indices"])
        assert idx.unique().numel() == t["n_heldout"]
        full = np.load(SAMPLES / s["name"] / "val.npz")
        x, y = torch.from_numpy(full["x"])[idx], torch.from_numpy(full["y"])[idx]
        report = json.loads(Path(s["files"]["tune_report"]).read_text())
        assert report["chosen"]["kind"] == t["chosen"]
        assert report["chosen"]["heldout"]["nll"] == pytest.approx(t["heldout"][t["chosen"]]["nll"])
        written = bncorrect.apply(SAMPLES / s["name"] / "model.pt", s["files"]["tuned"]).model.eval()
        plain = bncorrect.load(SAMPLES / s["name"] / "model.pt")
        with torch.no_grad():
            nll, top1 = _metrics(written(x), y)
            ema_nll, ema_top1 = _metrics(plain(x), y)
        assert t["heldout"][t["chosen"]]["nll"] == pytest.approx(nll, abs=1e-5)
        assert t["heldout"][t["chosen"]]["top1"] == pytest.approx(top1)
        assert t["heldout"]["ema"]["nll"] == pytest.approx(ema_nll, abs=1e-6)
        assert t["heldout"]["ema"]["top1"] == pytest.approx(ema_top1)
        # the guard: what was written is no worse than plain BN on the held-out half
        assert nll <= ema_nll + 1e-9
        assert Path(s["files"]["tune_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

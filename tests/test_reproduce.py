"""scripts/reproduce.py: every row of one network's evaluation, the tune row against a direct re-scoring of
the corrections it wrote, and the tables built from the records."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import reproduce  # noqa: E402

import bncorrect  # noqa: E402
from bncorrect.corrections import load_corrections  # noqa: E402
from bncorrect.layers import correct_model  # noqa: E402
from bncorrect.tune import KINDS  # noqa: E402

SAMPLE = ROOT / "sample_checkpoints" / "digits_b2"


def _direct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model.eval()(x).double()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def test_evaluate_scores_every_row_on_the_test_half_and_tune_writes_what_it_scores(tmp_path: Path) -> None:
    folder = tmp_path / "digits_b2"
    folder.mkdir()
    for name in ("model.pt", "val.npz", "model_card.json"):
        shutil.copy(SAMPLE / name, folder / name)
    prev = torch.get_num_threads()
    try:
        rows = reproduce.evaluate(folder, 2, seed=1)
    finally:
        torch.set_num_threads(prev)
    assert set(rows) == set(reproduce.METHODS)
    data = np.load(SAMPLE / "val.npz")
    half = len(data["x"]) // 2
    x, y = torch.from_numpy(data["x"][half:]), torch.from_numpy(data["y"][half:])
    nll, top1 = _direct(bncorrect.load(SAMPLE / "model.pt"), x, y)
    assert rows["EMA"]["nll"] == pytest.approx(nll, abs=1e-6) and rows["EMA"]["top1"] == pytest.approx(top1)
    tune = rows["tune"]
    assert tune["chosen"] in KINDS
    assert tune["heldout_chosen_nll"] <= tune["heldout_ema_nll"] + 1e-12  # the guard, on tune's held-out part
    corr = load_corrections(folder / "tuned.safetensors")
    stats = corr.layers
    assert all(lc.running_mean is None for lc in stats.values())
    model = correct_model(
        bncorrect.load(SAMPLE / "model.pt"),
        {n: lc.alpha for n, lc in stats.items()},
        {n: lc.beta for n, lc in stats.items()},
    )
    nll, top1 = _direct(model, x, y)
    assert tune["nll"] == pytest.approx(nll, abs=1e-5) and tune["top1"] == pytest.approx(top1)
    # on this B = 2 network every correction helps on the test half, the written one included
    assert tune["nll"] < rows["EMA"]["nll"]


def test_tables_show_the_tune_row_and_what_it_chose() -> None:
    def record(seed: int, ema: float, tuned: float, chosen: str) -> dict[str, object]:
        rows = {m: {"nll": ema, "top1": 0.9, "alpha": 0.1} for m in reproduce.METHODS}
        rows["tune"] = {"nll": tuned, "top1": 0.95, "alpha": None, "chosen": chosen}
        return {"dataset": "digits", "B": 2, "seed": seed, "rows": rows}

    results = [record(0, 0.2, 0.1, "tuned"), record(1, 0.4, 0.5, "ema")]
    table = reproduce.markdown_table(results, "digits").splitlines()
    assert "tune" in table[0].split(" | ")
    cells = table[2].split(" | ")
    assert cells[reproduce.METHODS.index("tune") + 1] == "0.300 ± 0.283 (5.0 ± 0.0%)"
    line = reproduce.tune_table(results).splitlines()[2].split(" | ")
    assert line[2:7] == ["tuned, ema", "0.3000", "0.3000", "0.3000", "1/2 |"]

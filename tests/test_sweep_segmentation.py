"""sweep-alpha for dense prediction: segmentation rows (pixel-nll, pixel accuracy, mIoU) against a direct
computation (a corrected copy of the model on all data, plain torch), stacked against one candidate at a
time, the choice, masks in the data files, the CLI report, the ONNX path, and the errors (detection
outputs included)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect import api
from bncorrect import sweep as sweep_module
from bncorrect.data import load_data
from bncorrect.errors import DataError, UsageError
from bncorrect.layers import correct_model
from bncorrect.sweep import SEGMENTATION_METRICS, select_output, sweep_alpha

HERE = Path(__file__).resolve()
K = 4  # classes
IGNORE = 255
ALPHAS = [0.0, 0.05, 0.2, 0.5]


class SegNet(nn.Module):
    """Conv-BN-ReLU twice, then 1x1 convolutions to K classes: {"out": main head, "aux": auxiliary head}, as
    torchvision segmentation models return."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(6, K, 1)
        self.aux = nn.Conv2d(6, K, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"out": self.classifier(h), "aux": self.aux(h)}


def seg_net(seed: int = 0) -> nn.Module:
    """The test model with trained-looking weights and running statistics (also ``--arch FILE:seg_net``)."""
    g = torch.Generator().manual_seed(seed)
    net = SegNet()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


class OutOnly(nn.Module):
    """The per-pixel logits alone (for an ONNX graph with one output)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


class Detector(nn.Module):
    """Returns what torchvision detection models return in eval mode: one dict per image."""

    def __init__(self) -> None:
        super().__init__()
        self.body = seg_net(3).body

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        h = self.body(x).mean((2, 3))
        return [
            {"boxes": h[i, :4].reshape(1, 4), "scores": h[i, :1], "labels": h[i, :1].long()}
            for i in range(len(h))
        ]


def make_data(n: int = 24, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 3, size, size) and masks (n, size, size) in 0..K-1, with a border and some random pixels
    marked IGNORE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 1.5 + 0.3
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0.5).long()
    flip = torch.rand(n, size, size, generator=g) < 0.3
    y = torch.where(flip, torch.randint(0, K, (n, size, size), generator=g), y)
    y[:, 0, :] = IGNORE
    y[torch.rand(n, size, size, generator=g) < 0.1] = IGNORE
    return x, y


def split(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def direct_metrics(model: nn.Module, x, y, alpha: float, ignore: int = IGNORE) -> dict[str, object]:
    """One candidate the obvious way: a corrected copy run on all data, then plain torch per pixel."""
    m = correct_model(copy.deepcopy(model), alpha).eval()
    with torch.no_grad():
        logits = m(x)["out"].double()
    valid = y != ignore
    nll = F.cross_entropy(logits, torch.where(valid, y, 0), reduction="none")[valid].mean().item()
    pred = logits.argmax(1)
    acc = (pred == y)[valid].double().mean().item()
    ious: list[float | None] = []
    for c in range(K):
        tp = int(((pred == c) & (y == c) & valid).sum())
        fp = int(((pred == c) & (y != c) & valid).sum())
        fn = int(((pred != c) & (y == c) & valid).sum())
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    present = [v for v in ious if v is not None]
    return {"pixel_nll": nll, "pixel_acc": acc, "miou": sum(present) / len(present), "iou": ious}


def assert_row(row, ref) -> None:
    assert row.task == "segmentation"
    assert row.pixel_nll == pytest.approx(ref["pixel_nll"], abs=1e-6)
    assert row.nll == row.pixel_nll and row.top1 == row.pixel_acc
    assert row.pixel_acc == pytest.approx(ref["pixel_acc"], abs=1e-12)
    assert row.miou == pytest.approx(ref["miou"], abs=1e-12)
    assert row.iou is not None and len(row.iou) == K
    for got, want in zip(row.iou, ref["iou"], strict=True):
        assert (got is None) == (want is None) and (got is None or got == pytest.approx(want, abs=1e-12))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return seg_net(0)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data()


# ------------------------------------------------------------------------------------------- the rows
@pytest.mark.parametrize("stack", [True, False])
def test_rows_match_direct_computation(model, data, stack) -> None:
    x, y = data
    res = sweep_alpha(model, split(x, y, 10), ALPHAS, output_key="out", stack=stack)
    assert res.task == "segmentation" and res.metric == "pixel-nll"  # the default nll is pixel-nll here
    assert res.n_examples == 24 and res.num_classes == K and res.ignore_index == IGNORE
    assert res.n_pixels == int((y != IGNORE).sum())
    assert [r.alpha for r in res.rows] == ALPHAS
    assert res.strategy.startswith("stacked") == stack
    for row in res.rows:
        assert_row(row, direct_metrics(model, x, y, row.alpha))
    ema = res.ema
    for row in res.rows:
        assert row.nll_diff == pytest.approx(row.pixel_nll - ema.pixel_nll, abs=1e-12)
        assert row.miou_diff == pytest.approx(row.miou - ema.miou, abs=1e-12)
    assert len({round(r.pixel_nll, 6) for r in res.rows}) == len(ALPHAS)  # alpha matters on this model


def test_stacked_equals_one_at_a_time_and_pieces(model, data, monkeypatch) -> None:
    x, y = data
    batches = split(x, y, 10)
    one = sweep_alpha(model, batches, ALPHAS, output_key="out", stack=False)
    stacked = sweep_alpha(model, batches, ALPHAS, output_key="out", stack=True)
    # pieces of one example per evaluation (the memory bound for large maps) give the same sums
    monkeypatch.setattr(sweep_module, "DENSE_PIECE_BYTES", 1)
    pieces = sweep_alpha(model, [(x, y)], ALPHAS, output_key="out", stack=True)
    for other in (stacked, pieces):
        for a, b in zip(one.rows, other.rows, strict=True):
            assert a.pixel_nll == pytest.approx(
                b.pixel_nll, rel=1e-6
            )  # float32 convolutions, other batch sizes
            assert (a.pixel_acc, a.miou, a.iou, a.n_pixels) == (b.pixel_acc, b.miou, b.iou, b.n_pixels)


@pytest.mark.parametrize("metric", [*SEGMENTATION_METRICS, "nll"])
def test_choice_is_the_best_row(model, data, metric) -> None:
    x, y = data
    res = sweep_alpha(model, split(x, y, 12), ALPHAS, output_key="out", metric=metric)
    chosen = "pixel-nll" if metric == "nll" else metric
    assert res.metric == chosen
    values = {
        "pixel-nll": [r.pixel_nll for r in res.rows],
        "miou": [-r.miou for r in res.rows],
        "pixel-acc": [-r.pixel_acc for r in res.rows],
    }[chosen]
    assert res.best.value(chosen) == res.rows[int(np.argmin(values))].value(chosen)
    assert set(res.best_by_metric()) == set(SEGMENTATION_METRICS)
    report = res.as_report()
    assert report["best"] == report["best_by_metric"][chosen]


def test_ignore_index_value(model, data) -> None:
    """Another ignore value (-1) marking the same pixels gives the same rows; 255 then counts as a class
    value and is refused."""
    x, y = data
    y2 = torch.where(y == IGNORE, -1, y)
    a = sweep_alpha(model, [(x, y)], [0.0, 0.2], output_key="out")
    b = sweep_alpha(model, [(x, y2)], [0.0, 0.2], output_key="out", ignore_index=-1)
    assert b.ignore_index == -1
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert (ra.pixel_nll, ra.pixel_acc, ra.miou) == (rb.pixel_nll, rb.pixel_acc, rb.miou)
    with pytest.raises(DataError, match="mask value 255 is outside") as err:
        sweep_alpha(model, [(x, y)], [0.0], output_key="out", ignore_index=-1, data_hint="val.npz")
    assert "val.npz" in str(err.value) and "--ignore-index 255" in str(err.value)


# ------------------------------------------------------------------------------------------- files, CLI
@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_mask_files(tmp_path, data, suffix) -> None:
    from safetensors.torch import save_file

    x, y = data
    path = tmp_path / f"d{suffix}"
    masks = y.to(torch.uint8)
    if suffix == ".npz":
        np.savez(path, x=x.numpy(), y=masks.numpy())
    elif suffix == ".pt":
        torch.save({"x": x, "y": masks}, path)
    else:
        save_file({"x": x, "y": masks}, str(path))
    ds = load_data(path)
    assert ds.has_labels and ds.label_shape == (8, 8) and ds.y.dtype == torch.uint8
    assert torch.equal(ds.y.long(), y) and "masks 8x8" in ds.description
    item = ds[3]
    assert torch.equal(item[1].long(), y[3])
    (bx, by), *_ = list(api._loader(ds, 10, shuffle=False, seed=0, num_workers=0, max_examples=None)[0])
    assert torch.equal(by.long(), y[:10]) and torch.equal(bx, x[:10])


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.zeros((3, 1, 4, 4), np.int64), r"y\[:, 0\]"),
        (np.zeros((3, 4, 4, 1), np.int64), r"y\[\.\.\., 0\]"),
        (np.zeros((3, 5, 4, 4), np.int64), r"one-hot masks: y\.argmax\(1\)"),
        (np.zeros((3, 3, 4, 4), np.int64), "colour-coded masks"),
        (np.zeros((3, 1), np.int64), r"y\.reshape\(-1\)"),
        (np.zeros((3, 5), np.int64), r"one-hot or soft labels: y\.argmax\(1\)"),
        (np.zeros((2, 4, 4), np.int64), "3 examples but y has 2 masks"),
        (np.full((3, 4, 4), 0.5), "non-integral"),
    ],
)
def test_bad_mask_files(tmp_path, y, match) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 3, 4, 4), np.float32), y=y)
    with pytest.raises(DataError, match=match) as err:
        load_data(path)
    assert str(path) in str(err.value)
    assert "(N, H, W)" in str(err.value) or "masks" in match


@pytest.fixture
def seg_files(tmp_path, model, data) -> dict[str, Path]:
    x, y = data
    weights = tmp_path / "seg.pt"
    torch.save(model.state_dict(), weights)
    npz = tmp_path / "val.npz"
    np.savez(npz, x=x.numpy(), y=y.numpy())
    return {"weights": weights, "data": npz, "dir": tmp_path}


def test_cli_miou_report(cli, seg_files, model, data) -> None:
    x, y = data
    report = seg_files["dir"] / "r.json"
    plot = seg_files["dir"] / "p.png"
    res = cli(
        "sweep-alpha", seg_files["weights"], "--arch", f"{HERE}:seg_net", "--data", seg_files["data"],
        "--alphas", ",".join(map(str, ALPHAS)), "--metric", "miou", "--output-key", "out",
        "--report", report, "--plot", plot,
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "Chosen by miou" in res.out and "mIoU" in res.out
    rep = json.loads(report.read_text())
    assert {"metric", "n_examples", "best", "rows"} <= rep.keys()
    assert rep["metric"] == "miou" and rep["n_examples"] == 24 and rep["task"] == "segmentation"
    assert rep["ignore_index"] == IGNORE and rep["n_pixels"] == int((y != IGNORE).sum())
    assert "miou_convention" in rep
    assert [r["alpha"] for r in rep["rows"]] == ALPHAS
    for jrow in rep["rows"]:
        keys = {"alpha", "nll", "top1", "top5", "pixel_nll", "pixel_acc", "miou", "iou_per_class", "n_pixels"}
        assert keys <= jrow.keys()
        ref = direct_metrics(model, x, y, jrow["alpha"])
        assert jrow["pixel_nll"] == pytest.approx(ref["pixel_nll"], abs=1e-6)
        assert jrow["miou"] == pytest.approx(ref["miou"], abs=1e-12)
        assert jrow["pixel_acc"] == pytest.approx(ref["pixel_acc"], abs=1e-12)
    assert rep["best"]["miou"] == max(r["miou"] for r in rep["rows"])
    assert plot.stat().st_size > 0


def test_cli_errors_name_the_file_and_option(cli, seg_files, tmp_path, data) -> None:
    x, y = data
    base = ["sweep-alpha", seg_files["weights"], "--arch", f"{HERE}:seg_net", "--alphas", "0,0.1"]
    res = cli(*base, "--data", seg_files["data"])  # a dict of two maps: which one?
    assert res.code != 0 and "'out'" in res.err and "--output-key out" in res.err
    small = tmp_path / "small.npz"
    np.savez(small, x=x.numpy(), y=y[:, :6, :6].numpy())
    res = cli(*base, "--data", small, "--output-key", "out")
    assert res.code != 0 and "small.npz" in res.err and "8x8" in res.err and "6x6" in res.err
    bad = tmp_path / "bad.npz"
    y_bad = y.clone()
    y_bad[2, 3, 3] = 9
    np.savez(bad, x=x.numpy(), y=y_bad.numpy())
    res = cli(*base, "--data", bad, "--output-key", "out")
    assert res.code != 0 and "bad.npz" in res.err and "mask value 9" in res.err
    assert "--ignore-index 9" in res.err
    res = cli(*base, "--data", seg_files["data"], "--output-key", "out", "--metric", "top1")
    assert res.code != 0 and "--metric top1" in res.err and "miou" in res.err


# ------------------------------------------------------------------------------------------- ONNX
def test_onnx_segmentation_graph(tmp_path, model, data) -> None:
    import onnx

    from bncorrect.onnx_export import _export_legacy

    x, y = data
    npz = tmp_path / "val.npz"
    np.savez(npz, x=x.numpy(), y=y.numpy())
    path = tmp_path / "seg.onnx"
    onnx.save(_export_legacy(OutOnly(model), (x[:2],), 17, True), str(path))  # BN nodes kept
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    ox = api.sweep_alpha(path, npz, alphas=[0.0, 0.2], metric="miou", device="cpu").report["sweep"]
    pt = api.sweep_alpha(
        copy.deepcopy(model), npz, alphas=[0.0, 0.2], metric="miou", output_key="out", device="cpu"
    ).report["sweep"]
    assert ox.task == "segmentation" and ox.metric == "miou" and ox.best.alpha == pt.best.alpha
    for a, b in zip(ox.rows, pt.rows, strict=True):
        ref = direct_metrics(model, x, y, a.alpha)
        assert a.pixel_nll == pytest.approx(ref["pixel_nll"], abs=1e-5)
        assert a.pixel_nll == pytest.approx(b.pixel_nll, abs=1e-5)
        assert (a.pixel_acc, a.miou) == pytest.approx((ref["pixel_acc"], ref["miou"]), abs=1e-12)
    small = tmp_path / "small.npz"
    np.savez(small, x=x.numpy(), y=y[:, :6, :6].numpy())
    with pytest.raises(DataError, match="8x8") as err:
        api.sweep_alpha(path, small, alphas=[0.0], device="cpu")
    assert "small.npz" in str(err.value)


# ------------------------------------------------------------------------------------------- errors
def test_detection_outputs_are_refused_with_what_applies(tmp_path, data) -> None:
    x, _ = data
    det = Detector().eval()
    labels = torch.zeros(len(x), dtype=torch.long)
    for key in (None, 0, "0"):
        with pytest.raises(UsageError, match="detections") as err:
            sweep_alpha(det, [(x, labels)], [0.0, 0.1], output_key=key)
        text = str(err.value)
        assert re.search(r"a list of \d+ dicts \(keys boxes, scores, labels\), one per image", text)
        assert all(cmd in text for cmd in ("estimate", "recalibrate", "apply", "diagnose"))
        assert "--output-key 0" not in text
    # what the message recommends does run on it: estimate needs no labels
    npz = tmp_path / "x.npz"
    np.savez(npz, x=x.numpy())
    est = api.estimate(Detector().eval(), npz, 4, device="cpu").report["estimate"]
    assert len(est.layers) == 2


def test_output_hints_name_the_logits() -> None:
    out = torch.zeros(2, K, 8, 8)
    with pytest.raises(UsageError, match=r"--output-key 1 \(the \(2, 4, 8, 8\) tensor\)"):
        select_output((torch.zeros(2), out), rows=2)
    with pytest.raises(UsageError, match=r"--output-key out \(the \(2, 4, 8, 8\) tensor\)") as err:
        select_output({"aux": out, "out": out}, rows=2)
    assert "aux: (2, 4, 8, 8) float32" in str(err.value)


def test_labels_that_do_not_go_with_the_output(model, data) -> None:
    x, y = data
    with pytest.raises(DataError, match=r"holds one class label per example") as err:
        sweep_alpha(model, [(x, y[:, 0, 0].clamp(0, K - 1))], [0.0], output_key="out", data_hint="v.npz")
    assert "v.npz" in str(err.value) and "(N, 8, 8)" in str(err.value)
    pooled = nn.Sequential(OutOnly(model), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, K) class scores
    with pytest.raises(DataError, match="the labels are masks"):
        sweep_alpha(pooled, [(x, y)], [0.0], data_hint="v.npz")
    with pytest.raises(UsageError, match="--metric miou is a segmentation metric"):
        sweep_alpha(pooled, [(x, y[:, 1, 1].clamp(0, K - 1))], [0.0], metric="miou")
    with pytest.raises(DataError, match="every mask pixel is the ignore index 255"):
        sweep_alpha(model, [(x, torch.full_like(y, IGNORE))], [0.0], output_key="out")
    with pytest.raises(UsageError, match="ignore-index must be an integer"):
        sweep_alpha(model, [(x, y)], [0.0], output_key="out", ignore_index=2.5)  # type: ignore[arg-type]

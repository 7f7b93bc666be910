"""scripts/compare_methods.py: every method builds and normalizes as it says; convert-back + post-hoc path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import compare_methods as cm  # noqa: E402
import make_samples  # noqa: E402

from bncorrect.nn import (  # noqa: E402
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchRenorm1d,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
)

INPUT = {"digits": (1, 8, 8), "mnist1d": (1, 40)}
PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and the training runs single-threaded anyway."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _build(dataset: str, method: str, B: int, forwards: int = 1000, seed: int = 0) -> cm.MethodSetup:
    torch.manual_seed(seed)
    return cm.build_model(dataset, method, B, forwards)


def _no_dropout(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


def _norm_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm)]


def _first_norm_io(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(input, output) of the first normalization layer and the logits, for one forward."""
    layer = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm))
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, i, o: seen.extend([i[0].detach(), o.detach()]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen[0], seen[1], logits


def _bn_reference(x: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps), mean/var over each consecutive group of examples (gamma 1, beta 0)."""
    out = []
    for chunk in x.chunk(groups):
        dims = [0, *range(2, x.dim())]
        mean = chunk.mean(dim=dims, keepdim=True)
        var = chunk.var(dim=dims, unbiased=False, keepdim=True)
        out.append((chunk - mean) / torch.sqrt(var + eps))
    return torch.cat(out)


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
@pytest.mark.parametrize("B", [2, 4])
def test_every_method_builds_with_its_layers(dataset: str, B: int) -> None:
    expected = {
        "bn": None,
        "ghost": (GhostBatchNorm1d, GhostBatchNorm2d),
        "renorm": (BatchRenorm1d, BatchRenorm2d),
        "bgn": (BatchGroupNorm1d, BatchGroupNorm2d),
        "gn": (nn.GroupNorm,),
    }
    plain = _norm_types(_build(dataset, "bn", B).model)
    for method in cm.METHODS:
        setup = _build(dataset, method, B)
        types = _norm_types(setup.model)
        assert len(types) == len(plain), method
        if method == "cbn":
            # Conv -> BN pairs become CBN; the digits head's BatchNorm1d (after a Linear) stays plain
            n_conv = 3 if dataset == "digits" else 4
            assert types.count(CrossIterationBatchNorm2d) == n_conv
            assert (types.count(nn.BatchNorm1d) == 1) == (dataset == "digits")
        elif expected[method] is None:
            assert all(t in PLAIN_BN for t in types)
        else:
            assert all(t in expected[method] for t in types), (method, types)
        x = torch.randn(8, *INPUT[dataset])
        setup.model.train()
        assert setup.model(x).shape == (8, 10)
        assert setup.forward_size == (B if method in ("bn", "renorm", "cbn") else 64)


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_ghost_on_whole_batch_is_chunked_plain_bn(dataset: str) -> None:
    B, n = 2, 8
    torch.manual_seed(1)
    x, y = torch.randn(n, *INPUT[dataset], dtype=torch.float64), torch.randint(0, 10, (n,))
    plain = _no_dropout(_build(dataset, "bn", B).model.double())  # double: B = 2 amplifies float32 rounding
    ghost = _no_dropout(_build(dataset, "ghost", B).model.double())
    # chunked plain BN: each chunk of B forwarded on its own, as make_samples' loop does
    outs, ins = [], []
    for chunk in x.split(B):
        i, o, logits = _first_norm_io(plain, chunk)
        ins.append(i)
        outs.append(logits)
        torch.testing.assert_close(o, _bn_reference(i, 1), atol=1e-5, rtol=1e-5)  # BN on the chunk
    ref_logits = torch.cat(outs)
    i, o, logits = _first_norm_io(ghost, x)
    torch.testing.assert_close(i, torch.cat(ins))
    torch.testing.assert_close(o, _bn_reference(i, n // B), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    # same loss gradients (loss summed over chunks / SGD batch)
    loss_p = sum(
        nn.functional.cross_entropy(plain(c), t, reduction="sum")
        for c, t in zip(x.split(B), y.split(B), strict=True)
    )
    (loss_p / n).backward()
    (nn.functional.cross_entropy(ghost(x), y, reduction="sum") / n).backward()
    for (name, p), q in zip(plain.named_parameters(), ghost.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-8, msg=name)
    # what differs: running statistics (one update with the mean of the ghost statistics vs 4 sequential)
    rm_plain = next(m for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)).running_mean
    rm_ghost = next(m for m in ghost.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)).running_mean
    assert not torch.allclose(rm_plain, rm_ghost)


@pytest.mark.parametrize("B", [2, 4])
def test_batch_group_norm_groups_examples_and_channels(B: int) -> None:
    setup = _build("mnist1d", "bgn", B)
    cpg = 16 // B
    assert setup.settings["channels_per_group"] == cpg
    layer = next(m for m in setup.model.modules() if isinstance(m, BatchGroupNorm1d))
    assert layer.channel_groups == layer.num_features // cpg and layer.examples_per_group == B
    torch.manual_seed(2)
    x = torch.randn(8, 1, 40)
    setup.model.train()
    i, o, _ = _first_norm_io(setup.model, x)
    n, c, length = i.shape
    g = i.reshape(n // B, B, c // cpg, cpg, length)
    mean = g.mean(dim=(1, 3, 4), keepdim=True)
    var = g.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
    ref = ((g - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, length)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_batch_group_norm_rejects_indivisible_channels() -> None:
    model = nn.Sequential(nn.Conv1d(1, 6, 3), nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="not a multiple"):
        cm._to_batch_group(model, 2)


def test_renorm_schedule_scaled_to_training() -> None:
    r_max, d_max = cm.renorm_schedule(130_000)
    assert (r_max.begin, r_max.finish, d_max.begin, d_max.finish) == (5_000, 40_000, 5_000, 25_000)
    forwards = cm.total_forwards(1297, 2, 30)  # digits B = 2: 20 steps x 30 epochs x 32 chunks
    assert forwards == 19_200
    setup = _build("digits", "renorm", 2, forwards)
    layer = next(m for m in setup.model.modules() if isinstance(m, BatchRenorm2d))
    assert layer.current_bounds() == (1.0, 0.0)  # BN at the start
    layer.num_batches_tracked.fill_(round(19_200 * 40 / 130))
    assert layer.current_bounds() == pytest.approx((3.0, 5.0))
    layer.num_batches_tracked.fill_(round(19_200 * 22.5 / 130))  # halfway along r_max's ramp
    assert layer.current_bounds()[0] == pytest.approx(2.0, abs=1e-3)
    # at step 0 (r_max = 1, d_max = 0) the training forward is plain BN's
    plain = _no_dropout(_build("digits", "bn", 2, forwards).model)
    renorm = _no_dropout(_build("digits", "renorm", 2, forwards).model)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(renorm(x), plain(x), atol=1e-5, rtol=1e-5)


def test_mnist1d_2d_twin_is_exact() -> None:
    torch.manual_seed(3)
    net = make_samples.DATASETS["mnist1d"].factory()
    twin = cm.as_2d(net)
    assert set(twin.state_dict()) == set(net.state_dict())
    x = torch.randn(6, 1, 40)
    net.train(), twin.train()
    torch.testing.assert_close(twin(x), net(x), atol=1e-5, rtol=1e-5)  # also updates both running stats
    net.eval(), twin.eval()
    torch.testing.assert_close(twin(x), net(x), atol=1e-5, rtol=1e-5)
    back = cm.from_2d(twin, make_samples.DATASETS["mnist1d"].factory).eval()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    with pytest.raises(ValueError, match="keys differ"):
        cm.from_2d(nn.Sequential(nn.Linear(2, 2)), make_samples.DATASETS["mnist1d"].factory)


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_cbn_pools_the_window_of_chunks(dataset: str) -> None:
    """Without an optimizer step between chunks the compensation is zero and CBN's k-th chunk is normalized
    with the (biased) statistics of all k chunks' inputs of the layer."""
    B = 4
    setup = _build(dataset, "cbn", B, forwards=0)  # burn-in 0
    k = setup.settings["window"]
    assert k == 4 and setup.settings["burn_in_forwards"] == 0
    model = _no_dropout(setup.model)
    torch.manual_seed(4)
    ins = []
    for chunk in torch.randn(k * B, *INPUT[dataset]).split(B):
        i, o, _ = _first_norm_io(model, chunk)
        ins.append(i)
    pooled = torch.cat(ins)
    dims = [0, *range(2, pooled.dim())]
    mean = pooled.mean(dim=dims, keepdim=True)
    var = pooled.var(dim=dims, unbiased=False, keepdim=True)
    torch.testing.assert_close(o, (ins[-1] - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-4)
    # ... which is not BN over the last chunk alone
    assert not torch.allclose(o, _bn_reference(ins[-1], 1), atol=1e-3)


def test_group_norm_is_batch_independent() -> None:
    setup = _build("digits", "gn", 2)
    model = _no_dropout(setup.model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)] == [8, 8, 8, 8]
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x)[:1], model(x[:1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no BatchNorm form"):
        cm.to_plain(model, "digits", "gn")


def test_unknown_method_and_bad_forward_size() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        cm.build_model("digits", "layernorm", 2, 10)
    with pytest.raises(ValueError, match="forward size"):
        make_samples._train_epochs(
            nn.Linear(2, 2),
            torch.zeros(64, 2),
            torch.zeros(64, dtype=torch.long),
            B=2,
            sgd_batch=64,
            epochs=1,
            lr=0.1,
            weight_decay=0.0,
            grad_clip=None,
            generator=torch.Generator(),
            forward_size=48,
        )


def _halves(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> tuple[Path, Path]:
    half = len(x) // 2
    tune, test = tmp_path / "tune.npz", tmp_path / "test.npz"
    np.savez(tune, x=x[:half], y=y[:half])
    np.savez(test, x=x[half:], y=y[half:])
    return tune, test


@pytest.mark.parametrize(("dataset", "method"), [("digits", "ghost"), ("mnist1d", "cbn"), ("digits", "gn")])
def test_short_training_convert_back_and_post_hoc(tmp_path: Path, dataset: str, method: str) -> None:
    rng = np.random.default_rng(0)
    shape = INPUT[dataset]
    x_tr = rng.standard_normal((128, *shape)).astype(np.float32)  # two SGD batches of 64
    y_tr = rng.integers(0, 10, 128).astype(np.int64)
    run = cm.Run(dataset, method, 2, 0, 1)
    model, record = cm.train_model(run, data=(x_tr, y_tr))
    assert record["n_train"] == 128 and len(record["train_loss_per_epoch"]) == 1
    if method == "gn":
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    else:
        types = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        assert types and types <= set(PLAIN_BN)
        fresh = make_samples.DATASETS[dataset].factory()
        assert set(fresh.state_dict()) == set(model.state_dict())
        counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, PLAIN_BN)}
        assert counts == ({2} if method == "ghost" else {64})  # per step vs per chunk of 2
    path = tmp_path / f"{run.key}.pt"
    cm.save_run(path, model, run, record)
    x_va = rng.standard_normal((64, *shape)).astype(np.float32)
    y_va = rng.integers(0, 10, 64).astype(np.int64)
    tune, test = _halves(tmp_path, x_va, y_va)
    rows = cm.evaluate_run(path, run, tune, test)
    direct = make_samples.evaluate(model, torch.from_numpy(x_va[32:]), torch.from_numpy(y_va[32:]))
    assert rows["EMA"] == pytest.approx(direct, rel=1e-6)
    if method == "gn":
        assert set(rows) == {"EMA"}
        return
    assert set(rows) == set(cm.ROWS)
    alpha = rows["best alpha (NLL)"]["alpha"]
    assert 0.0 <= alpha <= 1.0
    assert 0.0 <= rows["EvalNorm offline"]["alpha_mean"] <= 1.0
    # the chosen alpha re-evaluated directly with bncorrect's layer correction
    from bncorrect.layers import correct_model

    corrected = correct_model(model, alpha)
    again = make_samples.evaluate(corrected, torch.from_numpy(x_va[32:]), torch.from_numpy(y_va[32:]))
    assert rows["best alpha (NLL)"]["nll"] == pytest.approx(again["nll"], rel=1e-5)
    # tune's row: the corrections file it wrote, read back and applied by hand, re-scored on the test half
    import bncorrect
    from bncorrect.corrections import load_corrections
    from bncorrect.tune import KINDS

    tune_row = rows["tune"]
    assert tune_row["chosen"] in KINDS
    assert tune_row["heldout_chosen_nll"] <= tune_row["heldout_ema_nll"] + 1e-12  # the guard
    corr = load_corrections(cm.tuned_path(path))
    fresh = bncorrect.load(path)
    alpha = {n: lc.alpha for n, lc in corr.layers.items()}
    beta = {n: lc.beta for n, lc in corr.layers.items()}
    # EvalNorm after recalibration, when chosen, brings its statistics: they replace the running ones
    recal = tune_row["chosen"] == "evalnorm-recal"
    assert all((lc.running_mean is not None) == recal for lc in corr.layers.values())
    with torch.no_grad():
        for name, lc in corr.layers.items():
            if lc.running_mean is not None:
                fresh.get_submodule(name).running_mean.copy_(lc.running_mean)
                fresh.get_submodule(name).running_var.copy_(lc.running_var)
    rescored = make_samples.evaluate(
        correct_model(fresh, alpha, beta), torch.from_numpy(x_va[32:]), torch.from_numpy(y_va[32:])
    )
    assert tune_row["nll"] == pytest.approx(rescored["nll"], rel=1e-5)
    assert tune_row["top1"] == pytest.approx(rescored["top1"])
    if tune_row["chosen"] == "ema":
        assert tune_row["nll"] == pytest.approx(rows["EMA"]["nll"], rel=1e-6)


def test_markdown_table_mean_and_sd() -> None:
    def result(method: str, seed: int, nll: float, top1: float, b: int | None = 2) -> dict[str, object]:
        rows: dict[str, dict[str, float]] = {"EMA": {"nll": nll, "top1": top1}}
        if method != "gn":
            rows["best alpha (NLL)"] = {"nll": nll / 2, "top1": top1, "alpha": 0.1 * (seed + 1)}
            rows["EvalNorm offline"] = {"nll": nll / 4, "top1": top1, "alpha_mean": 0.25}
            if seed == 1:  # tune measured on one seed of two: the cell names it
                rows["tune"] = {"nll": nll / 3, "top1": top1, "chosen": "ema"}
        return {
            "dataset": "digits",
            "method": method,
            "B": b,
            "seed": seed,
            "train_seconds": 10.0,
            "rows": rows,
        }

    results = [result("bn", 0, 0.1, 0.9), result("bn", 1, 0.3, 0.8), result("gn", 0, 0.2, 0.95, None)]
    table = cm.markdown_table(results, "digits", [2])
    lines = table.splitlines()
    assert len(lines) == 4
    bn = lines[2].split(" | ")
    # NLL mean 0.2, sample sd 0.1414; error 15% ± 7.07
    assert bn[3:6] == ["0.200 ± 0.141", "15.0 ± 7.1", "0.100 ± 0.071"]
    assert bn[7] == "0.1, 0.2"
    assert bn[11:14] == ["0.100 ± 0.000 (seeds 1)", "20.0 ± 0.0", "ema"]
    gn = lines[3].split(" | ")
    assert gn[3:5] == ["0.200 ± 0.000", "5.0 ± 0.0"] and gn[5:14] == ["n/a"] * 9


def test_merge_keeps_only_records_not_recomputed() -> None:
    def rec(dataset: str, seed: int, tag: str) -> dict[str, object]:
        return {"dataset": dataset, "method": "bn", "B": 2, "seed": seed, "epochs": 30, "tag": tag}

    new = [rec("digits", 0, "new")]
    old = [rec("digits", 0, "old"), rec("mnist1d", 0, "old"), rec("digits", 1, "old")]
    merged = cm.merge_results(new, old)
    assert [(r["dataset"], r["seed"], r["tag"]) for r in merged] == [
        ("digits", 0, "new"),
        ("mnist1d", 0, "old"),
        ("digits", 1, "old"),
    ]

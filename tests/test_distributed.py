"""Data-parallel passes under torch.distributed (bncorrect.distributed).

Two kinds of tests: the merge function of every accumulator, without a process group (the merge of a
split equals the whole, empty parts included; the reservoir merge is a uniform sample of the union), and
two real processes under torchrun with the gloo backend on the loopback interface (tests/dist_worker.py
for the library and the Python API, and the CLI itself), compared with one process on the same data.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bncorrect.diagnosis import DiscrepancyMeter, merge_meters
from bncorrect.distributed import ShardedBatches, shard_order
from bncorrect.estimation import SampleReservoir, merge_reservoirs
from bncorrect.recalibration import PopulationMoments, merge_changes, merge_moments
from bncorrect.sweep import SegmentationTally, Tally, merge_segmentation_tallies, merge_tallies

from . import dist_worker, toys

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT = 120  # seconds for one two-process launch


# ------------------------------------------------------------------------------------------------ shards
def test_shard_order_splits_whole_batches_round_robin():
    order = list(range(100, 0, -1))
    shards = [shard_order(order, 16, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == sorted(order)
    batches = [order[i : i + 16] for i in range(0, 100, 16)]  # 7 batches, the last of 4
    for r, shard in enumerate(shards):
        again = [shard[i : i + 16] for i in range(0, len(shard), 16)]
        assert again == batches[r::3]  # re-batching a shard gives exactly its batches
    assert shard_order(order, 16, 0, 1) == order
    assert shard_order(list(range(10)), 16, 1, 2) == []  # fewer batches than ranks: an empty shard


def test_sharded_batches_every_world_th():
    items = list(range(11))
    assert list(ShardedBatches(items, 1, 3)) == [1, 4, 7, 10]
    assert list(ShardedBatches(items, 1, 3)) == [1, 4, 7, 10]  # re-iterable


# ------------------------------------------------------------------------------------------------ merges
def _moments(batches):
    pm = PopulationMoments(batches[0].shape[1]) if batches else PopulationMoments(3)
    for b in batches:
        pm.add(b)
    return pm.state()


def test_merge_moments_of_splits_equals_whole():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 3, 5, 5, generator=g) * 2 + 1 for n in (4, 7, 1, 9, 3)]
    whole = torch.cat(xs)
    direct_mean = whole.double().mean(dim=(0, 2, 3))
    direct_var = whole.double().var(dim=(0, 2, 3), correction=0)
    sequential = _moments(xs)
    for split in ([xs[:2], xs[2:]], [xs[:1], [], xs[1:4], xs[4:]], [[], xs, []]):
        merged = merge_moments([_moments(p) if p else None for p in split])
        assert merged is not None
        count, mean, m2 = merged
        assert count == whole.numel() // 3
        # equal to one accumulator fed every batch, to float64 rounding
        torch.testing.assert_close(mean, sequential[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(m2, sequential[2], rtol=1e-12, atol=1e-12)
        # and to the float64 moments of all values (each batch's moments are taken in float32)
        torch.testing.assert_close(mean, direct_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(m2 / count, direct_var, rtol=1e-6, atol=1e-6)
    empty = PopulationMoments(3).state()
    assert merge_moments([empty, None]) is None


def test_merge_changes_sums_layers():
    a = {"l1": (torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0]))}
    b = {"l1": (torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])), "l2": (torch.ones(1), torch.zeros(1))}
    merged = merge_changes([a, {}, b])
    torch.testing.assert_close(merged["l1"][0], torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(merged["l1"][1], torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(merged["l2"][0], torch.ones(1))


def _reservoir(x: torch.Tensor, start: int, capacity: int, seed: int) -> SampleReservoir:
    """A reservoir fed ``x`` (examples numbered from ``start``) in batches of 5."""
    res = SampleReservoir(x.shape[1], capacity, 4, torch.Generator().manual_seed(seed))
    for i in range(0, x.shape[0], 5):
        xb = x[i : i + 5]
        mu = xb.mean(dim=(2, 3))
        var = xb.var(dim=(2, 3), correction=0)
        res.add(xb, mu, var, mu * 0 + 1, var * 0 + 2)
    state = res.state()
    return state._replace(example=state.example + start)


def test_merge_reservoirs_keeps_everything_when_it_fits():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 3, 2, 2, generator=g)
    parts = [_reservoir(x[:15], 0, 64, 1), _reservoir(x[15:], 15, 64, 2), None]
    merged = merge_reservoirs(parts, 64, torch.Generator().manual_seed(0))
    assert merged is not None and merged.seen == 23
    assert merged.values is not None and merged.values.shape == (3, 23, 4)
    for c in range(3):
        assert sorted(merged.example[c].tolist()) == list(range(23))  # every example once per channel
        for r in range(23):
            e = int(merged.example[c, r])
            # the row is example e's channel c (all 4 positions of a 2 x 2 map, in some order)
            assert sorted(merged.values[c, r].tolist()) == pytest.approx(sorted(x[e, c].reshape(-1).tolist()))
            assert float(merged.stats[0, c, r]) == pytest.approx(float(x[e, c].mean()), abs=1e-6)
    assert merge_reservoirs([None, _reservoir(x[:0], 0, 8, 3)], 8, torch.Generator()) is None


def test_merge_reservoirs_is_a_uniform_sample_of_the_union():
    """Parts of 30 and 10 examples (and an empty one), capacity 8: every example of the union must be
    kept with probability 8/40 in every channel, whichever part saw it (chi-square over 40 examples)."""
    n0, n1, cap, channels, trials = 30, 10, 8, 2, 1500
    x = torch.zeros(n0 + n1, channels, 2, 2)
    counts = np.zeros((channels, n0 + n1))
    gen = torch.Generator().manual_seed(0)
    for t in range(trials):
        parts = [
            _reservoir(x[:n0], 0, cap, 2 * t + 1),
            None,
            _reservoir(x[n0:], n0, cap, 2 * t + 2),
        ]
        merged = merge_reservoirs(parts, cap, gen)
        assert merged is not None and merged.values is not None and merged.values.shape[1] == cap
        for c in range(channels):
            kept = merged.example[c].tolist()
            assert len(set(kept)) == cap  # without replacement
            counts[c, kept] += 1
    expected = trials * cap / (n0 + n1)
    for c in range(channels):
        chi2 = float(((counts[c] - expected) ** 2 / expected).sum())
        # 39 degrees of freedom (counts are slightly negatively correlated, which only lowers chi2):
        # P(chi2 > 72) < 1e-3
        assert chi2 < 72, chi2
        # the smaller part is neither over- nor under-represented
        assert counts[c, n0:].sum() / (trials * cap) == pytest.approx(n1 / (n0 + n1), abs=0.02)


def _tally(logits_y, k):
    t = Tally(k)
    for logits, y in logits_y:
        t.add(logits, y, 3)
    return t


def test_merge_tallies_of_splits_equals_whole():
    g = torch.Generator().manual_seed(2)
    pieces = [
        (torch.randn(4, n, 6, generator=g) * 3, torch.randint(0, 6, (n,), generator=g)) for n in (5, 3, 8)
    ]
    whole = _tally(pieces, 4)
    merged = merge_tallies([_tally(pieces[:1], 4), _tally([], 4), _tally(pieces[1:], 4)])
    assert merged.n == whole.n == 16
    for name in ("nll", "nll2", "top1", "topk", "diff", "diff2", "better", "worse"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    # independently: the summed cross-entropy and top-1 hits of all 16 examples
    logits = torch.cat([p[0] for p in pieces], dim=1).double()
    y = torch.cat([p[1] for p in pieces])
    nll = -torch.log_softmax(logits, -1).gather(-1, y.view(1, -1, 1).expand(4, -1, 1)).squeeze(-1).sum(1)
    torch.testing.assert_close(merged.nll, nll, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.top1, (logits.argmax(-1) == y).sum(1).double())
    bad = Tally(4)
    bad.nonfinite[2] = True
    assert merge_tallies([whole, bad]).nonfinite.tolist() == [False, False, True, False]


def test_merge_segmentation_tallies_of_splits_equals_whole():
    g = torch.Generator().manual_seed(3)

    def piece(n):
        y = torch.randint(0, 3, (n, 4, 4), generator=g)
        y[0, 0, 0] = 255
        return torch.randn(2, n, 3, 4, 4, generator=g), y

    pieces = [piece(n) for n in (2, 3, 1)]

    def tally(ps):
        t = SegmentationTally(2, 3, 255)
        for logits, y in ps:
            t.add(logits, y)
        return t

    whole = tally(pieces)
    merged = merge_segmentation_tallies([tally(pieces[:2]), tally([]), tally(pieces[2:])])
    assert (merged.n, merged.pixels) == (whole.n, whole.pixels) == (6, 6 * 16 - 3)
    assert torch.equal(merged.confusion, whole.confusion)
    torch.testing.assert_close(merged.nll, whole.nll, rtol=1e-12, atol=1e-12)


def test_merge_meters_of_splits_equals_whole():
    g = torch.Generator().manual_seed(4)
    rows = [tuple(torch.randn(n, 3, 2, 2, generator=g) for _ in range(3)) for n in (4, 2, 6)]

    def meter(rs):
        m = DiscrepancyMeter(3)
        for train, ev, corr in rs:
            m.add(train, ev, corr, 16)
        return m

    whole = meter(rows)
    merged = merge_meters([meter(rows[:1]), meter([]), meter(rows[1:])])
    assert merged.count == whole.count and merged.outside == whole.outside
    torch.testing.assert_close(merged.l1_eval, whole.l1_eval, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.l1_corr, whole.l1_corr, rtol=1e-12, atol=1e-12)
    assert (merged.eval_min, merged.eval_max) == (whole.eval_min, whole.eval_max)
    assert (merged.train_min, merged.train_max) == (whole.train_min, whole.train_max)
    assert merged.result("l").as_dict() == whole.result("l").as_dict()


# ---------------------------------------------------------------------------------- two processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], log_dir: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this Python")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir is not None else []
    cmd = [
        str(TORCHRUN),
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *logs,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results of tests/dist_worker.py, and the single-process results on the whole data."""
    out = tmp_path_factory.mktemp("ranks")
    proc = _torchrun(["-m", "tests.dist_worker", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, dist_worker.cases(tmp_path_factory.mktemp("one"))


def _assert_same(a, b, *, rtol=1e-6, atol=1e-7, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], rtol=rtol, atol=atol, path=f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same(u, v, rtol=rtol, atol=atol, path=f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=path)
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rtol, abs=atol), path
    else:
        assert a == b, path


def test_every_rank_gets_the_same_result(two_ranks):
    (r0, r1), _ = two_ranks
    _assert_same(r0, r1, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["recal_eval", "recal_exact", "recal_train"])
def test_recalibrate_two_ranks_equals_one(two_ranks, key):
    (r0, _), ref = two_ranks
    # the moments are merged exactly (Chan's merge in float64): the float32 statistics agree to rounding
    _assert_same(r0[key]["stats"], ref[key]["stats"], rtol=1e-6, atol=1e-7)
    assert r0[key]["examples"] == ref[key]["examples"] == dist_worker.N
    assert r0[key]["passes"] == ref[key]["passes"]
    _assert_same(r0[key]["changes"], ref[key]["changes"], rtol=1e-9, atol=1e-12)


def test_recalibrate_train_matches_direct_computation(two_ranks):
    """Independently of bncorrect's own single-process path: the first layer's training-consistent
    statistics are the moments of its input (the first conv's output) over all examples."""
    (r0, _), _ = two_ranks
    net = dist_worker.model()
    x, _ = dist_worker.all_data()
    with torch.no_grad():
        h = net[0](x).double()
    mean, var = r0["recal_train"]["stats"]["1"]
    torch.testing.assert_close(mean.double(), h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), h.var(dim=(0, 2, 3), correction=0), rtol=1e-5, atol=1e-6)


def test_estimate_two_ranks_matches_one(two_ranks):
    (r0, _), ref = two_ranks
    est, one = r0["estimate"], ref["estimate"]
    assert (est["examples"], est["dropped"]) == (one["examples"], one["dropped"]) == (dist_worker.N, 0)
    # the data fits every reservoir: the merged sample holds the same rows as one process's
    assert est["rows"] == one["rows"]
    for name in one["alpha"]:
        # the grid's resolution is 0.1 / 3^5 ~ 4e-4; float32 sums in another row order may move a step
        assert est["alpha"][name] == pytest.approx(one["alpha"][name], abs=1e-3), name
        assert est["beta"][name] == pytest.approx(one["beta"][name], abs=1e-3), name
        assert est["l_aux"][name] == pytest.approx(one["l_aux"][name], rel=1e-4), name


def test_sweep_and_diagnose_two_ranks_equal_one(two_ranks):
    (r0, _), ref = two_ranks
    assert r0["sweep"]["n"] == ref["sweep"]["n"] == dist_worker.N
    _assert_same(r0["sweep"]["report"], ref["sweep"]["report"], rtol=1e-9, atol=1e-12)
    _assert_same(r0["diagnose"], ref["diagnose"], rtol=1e-9, atol=1e-12)


def test_api_two_ranks_equals_one(two_ranks):
    (r0, _), ref = two_ranks
    for name, (a, b) in ref["api_estimate"].items():
        assert r0["api_estimate"][name][0] == pytest.approx(a, abs=1e-3)
        assert r0["api_estimate"][name][1] == pytest.approx(b, abs=1e-3)
    _assert_same(r0["api_recal_train"], ref["api_recal_train"])
    _assert_same(r0["api_recal_eval"], ref["api_recal_eval"])  # one batch: rank 1's shard is empty
    _assert_same(r0["api_sweep"], ref["api_sweep"], rtol=1e-9, atol=1e-12)
    # a DataLoader split every second batch, and one with a DistributedSampler (its own shards)
    _assert_same(r0["api_sweep_loader"], ref["api_sweep_loader"], rtol=1e-9, atol=1e-12)
    _assert_same(r0["api_sweep_sampler"], ref["api_sweep_sampler"], rtol=1e-9, atol=1e-12)


def test_tune_two_ranks_matches_one(two_ranks):
    """tune: its passes (estimate, sweeps, held-out scores) run sharded and merged, the per-layer fit on
    rank 0 on the whole fitting part; the report equals one process's (to float rounding, which the fit's
    gradient steps may carry a little further)."""
    (r0, _), ref = two_ranks
    _assert_same(r0["api_tune"], ref["api_tune"], rtol=1e-4, atol=1e-6)
    # segmentation: the held-out and fitting-part tallies (pixel cross-entropy sums, confusion matrices)
    # merged across the ranks give one process's report
    seg, one = r0["api_tune_seg"], ref["api_tune_seg"]
    assert seg["task"] == one["task"] == "segmentation" and seg["n_pixels"] == one["n_pixels"]
    _assert_same(seg, one, rtol=1e-4, atol=1e-6)


def test_onnx_two_ranks_equal_one(two_ranks):
    """An ONNX graph (onnxruntime's passes) merges the same accumulators."""
    (r0, _), ref = two_ranks
    a, b = r0["onnx"], ref["onnx"]
    _assert_same(a["recal_train"], b["recal_train"])
    _assert_same(a["recal_eval"], b["recal_eval"])
    _assert_same(a["sweep"], b["sweep"], rtol=1e-9, atol=1e-12)
    for name, (alpha, beta) in b["estimate"].items():
        assert a["estimate"][name][0] == pytest.approx(alpha, abs=1e-3)
        assert a["estimate"][name][1] == pytest.approx(beta, abs=1e-3)


def test_failure_on_one_rank_is_raised_on_both(two_ranks):
    (r0, r1), _ = two_ranks
    assert r0["nan"] is not None and r0["nan"] == r1["nan"]
    assert r0["nan"][0] == "NumericalError" and "NaN" in r0["nan"][1]


def _rank_logs(log_dir: Path, rank: int) -> str:
    files = sorted(log_dir.rglob(f"{rank}/std*.log"))
    assert files, list(log_dir.rglob("*"))
    return "".join(f.read_text() for f in files)


def test_cli_recalibrate_under_torchrun(toy_files, cli_subprocess, tmp_path):
    """torchrun -m bncorrect recalibrate: rank 0 writes the file and prints; rank 1 prints nothing; the
    statistics are those of one process."""
    f = toy_files
    before = {p.name for p in tmp_path.iterdir() if p.is_file()}
    common = [f["state_dict"], "--arch", f["arch"], "--data", f["data"], "--device", "cpu"]
    one = tmp_path / "one.safetensors"
    two = tmp_path / "two.safetensors"
    res = cli_subprocess("recalibrate", *common, "--upstream", "train", "--batch-size", "4", "-o", one)
    assert res.code == 0, res.err
    logs = tmp_path / "logs"
    proc = _torchrun(
        [
            "-m",
            "bncorrect",
            "recalibrate",
            *map(str, common),
            "--upstream",
            "train",
            "--batch-size",
            "4",
            "-o",
            str(two),
        ],
        log_dir=logs,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rank_logs(logs, 1).strip() == ""  # rank 1: not a word
    assert "Wrote" in _rank_logs(logs, 0)
    a, b = load_file(str(one)), load_file(str(two))
    assert set(a) == set(b) and any(k.endswith("running_var") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    # nothing else written (no temporary file left by a second writer)
    assert {p.name for p in tmp_path.iterdir() if p.is_file()} - before == {
        "one.safetensors",
        "two.safetensors",
    }


def test_cli_estimate_under_torchrun(toy_files, cli_subprocess, tmp_path):
    f = toy_files
    common = [f["state_dict"], "--arch", f["arch"], "--data", f["data"], "--train-batch-size", "4"]
    common += ["--device", "cpu"]
    one = tmp_path / "one.safetensors"
    two = tmp_path / "two.safetensors"
    res = cli_subprocess("estimate", *common, "-o", one)
    assert res.code == 0, res.err
    logs = tmp_path / "logs"
    proc = _torchrun(
        ["-m", "bncorrect", "estimate", *map(str, common), "-o", str(two), "--json"], log_dir=logs
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rank_logs(logs, 1).strip() == ""
    assert '"train_batch_size"' in _rank_logs(logs, 0)
    a, b = load_file(str(one)), load_file(str(two))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-3, msg=k)


def test_cli_error_on_both_ranks_reported_once(toy_files, tmp_path):
    """A user error under torchrun: a non-zero exit, the message on rank 0 only, no traceback."""
    f = toy_files
    logs = tmp_path / "logs"
    bad = tmp_path / "bad.npz"
    x, y = toys.data(8)
    np.savez(bad, x=x[:, :2].numpy(), y=y.numpy())  # 2 channels for a 3-channel model
    proc = _torchrun(
        [
            "-m",
            "bncorrect",
            "estimate",
            str(f["state_dict"]),
            "--arch",
            f["arch"],
            "--data",
            str(bad),
            "--train-batch-size",
            "4",
            "--device",
            "cpu",
        ],
        log_dir=logs,
    )
    assert proc.returncode != 0
    assert _rank_logs(logs, 1).strip() == ""
    err = _rank_logs(logs, 0)
    assert "error:" in err and "Traceback" not in err
    shutil.rmtree(logs)

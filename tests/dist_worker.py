"""One rank of the two-process gloo tests (tests/test_distributed.py), launched by torchrun.

Every case runs bncorrect's passes on this rank's shard (the library's passes on batches given per rank,
and the Python API, which shards the data itself) and saves what it got to OUT/rank{RANK}.pt; the test
compares both ranks with each other and with the single-process run of :func:`cases` in the test process.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests import toys

N = 100  # examples: 7 batches of 16 (the last of 4), batch i on rank i % 2: 4 batches on rank 0, 3 on 1
BATCH = 16
B = 4


def model() -> torch.nn.Module:
    return toys.conv_net(seed=3)


def all_data() -> tuple[torch.Tensor, torch.Tensor]:
    return toys.data(N, seed=5)


def batches(rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches of the whole data, those of ``rank`` (batch i to rank i % world)."""
    x, y = all_data()
    out = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    return out[rank::world]


def cases(folder: Path, rank: int = 0, world: int = 1) -> dict[str, object]:
    """Every result the test compares, run on ``rank``'s shard (rank 0 of 1: the whole data); files go
    to ``folder``."""
    from bncorrect import api
    from bncorrect.diagnosis import diagnose_model
    from bncorrect.estimation import estimate_alpha_beta
    from bncorrect.recalibration import recalibrate_stats
    from bncorrect.sweep import sweep_alpha

    net = model()
    mine = batches(rank, world)
    x, y = all_data()
    out: dict[str, object] = {}
    for key, kwargs in {
        "recal_eval": {"upstream": "eval"},
        "recal_exact": {"upstream": "eval", "exact": True},
        "recal_train": {"upstream": "train", "batch_size": B},
    }.items():
        r = recalibrate_stats(net, mine, device="cpu", **kwargs)
        out[key] = {"stats": r.stats, "examples": r.examples, "passes": r.passes, "changes": r.changes}
    est = estimate_alpha_beta(net, mine, B, device="cpu", seed=0)
    out["estimate"] = {
        "alpha": est.alpha(),
        "beta": est.beta(),
        "examples": est.examples,
        "dropped": est.dropped,
        "rows": {ly.name: ly.sampled_rows for ly in est.layers},
        "l_aux": {ly.name: ly.l_aux for ly in est.layers},
    }
    sw = sweep_alpha(net, mine, [0.0, 0.05, 0.1, 0.3], device="cpu")
    out["sweep"] = {"report": sw.as_report(), "n": sw.n_examples}
    dg = diagnose_model(net, mine, B, device="cpu")
    out["diagnose"] = {"layers": [ly.as_dict() for ly in dg.layers], "examples": dg.examples}
    # the Python API shards the data itself (here: 2 loader batches of 64 and 36 for estimate)
    outcome = api.estimate(net, (x, y), B, device="cpu", seed=0)
    out["api_estimate"] = {n: (float(c.alpha), float(c.beta)) for n, c in outcome.corrections.layers.items()}
    outcome = api.recalibrate(net, (x, y), upstream="train", batch_size=B, device="cpu")
    out["api_recal_train"] = {
        n: (c.running_mean, c.running_var) for n, c in outcome.corrections.layers.items()
    }
    # one batch in all: rank 1's shard is empty
    outcome = api.recalibrate(net, (x, y), device="cpu")
    out["api_recal_eval"] = {
        n: (c.running_mean, c.running_var) for n, c in outcome.corrections.layers.items()
    }
    outcome = api.sweep_alpha(net, (x, y), alphas=[0.0, 0.1, 0.2], device="cpu")
    out["api_sweep"] = outcome.report["sweep"].as_report()
    # batches already made: a DataLoader is split every world-th batch; one with a DistributedSampler is
    # this rank's shard already
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    out["api_sweep_loader"] = (
        api.sweep_alpha(net, loader, alphas=[0.0, 0.1], device="cpu").report["sweep"].as_report()
    )
    sampled = (
        DataLoader(
            TensorDataset(x, y),
            batch_size=BATCH,
            sampler=DistributedSampler(TensorDataset(x, y), world, rank, shuffle=False),
        )
        if world > 1
        else loader
    )
    out["api_sweep_sampler"] = (
        api.sweep_alpha(net, sampled, alphas=[0.0, 0.1], device="cpu").report["sweep"].as_report()
    )
    outcome = api.tune(net, (x, y), B, holdout=0.4, seed=3, device="cpu", max_epochs=4)
    report = outcome.report["tune"].as_report()
    report.pop("timings", None)  # seconds differ from rank to rank
    out["api_tune"] = report
    # segmentation: per-pixel logits and masks, the tallies (pixel cross-entropy, confusion) merged
    sx, sy = toys.seg_data(40, seed=2)
    outcome = api.tune(toys.seg_net(seed=1), (sx, sy), B, metric="miou", holdout=0.4, seed=3, device="cpu",
                       max_epochs=2)  # fmt: skip
    report = outcome.report["tune"].as_report()
    report.pop("timings", None)
    out["api_tune_seg"] = report
    # an ONNX graph runs in onnxruntime: the same merges
    import onnx

    from bncorrect.onnx_export import _export_legacy

    path = folder / f"model{rank}.onnx"
    onnx.save(_export_legacy(net, (x[:2],), 17, True), str(path))
    xs = x[:40]  # batches of 16: 16, 16, 8 (rank 0: two, rank 1: one)
    onnx_out: dict[str, object] = {}
    outcome = api.recalibrate(path, (xs, y[:40]), upstream="train", batch_size=B, device="cpu")
    onnx_out["recal_train"] = {
        n: (c.running_mean, c.running_var) for n, c in outcome.corrections.layers.items()
    }
    outcome = api.recalibrate(path, (x, y), device="cpu")
    onnx_out["recal_eval"] = {
        n: (c.running_mean, c.running_var) for n, c in outcome.corrections.layers.items()
    }
    outcome = api.estimate(path, (x, y), B, device="cpu", seed=0)
    onnx_out["estimate"] = {n: (float(c.alpha), float(c.beta)) for n, c in outcome.corrections.layers.items()}
    outcome = api.sweep_alpha(path, (x, y), alphas=[0.0, 0.1, 0.2], device="cpu")
    onnx_out["sweep"] = outcome.report["sweep"].as_report()
    out["onnx"] = onnx_out
    if world > 1:
        # NaN in rank 1's data only: both ranks raise the same error instead of rank 0 waiting forever
        bad = [(b[0].clone(), b[1]) for b in mine]
        if rank == 1:
            bad[0][0][0, 0, 0, 0] = math.nan
        try:
            estimate_alpha_beta(net, bad, B, device="cpu")
            out["nan"] = None
        except Exception as e:  # the test checks its class and message
            out["nan"] = (type(e).__name__, str(e))
    return out


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.save(cases(out, rank, world), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

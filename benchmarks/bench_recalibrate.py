"""`recalibrate` against a direct PreciseBN-style loop (fvcore's update_bn_stats) over the same data.

Both compute training-consistent population statistics (`--upstream train`) over the same batches; the
script checks they agree and prints the time ratio. It also times the inference-consistent mode
(`--upstream eval`, one partial pass per layer), which does more work by design.

Usage: python benchmarks/bench_recalibrate.py [--examples 1024] [--b 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import interleaved, machine, resnet_like
from fvcore.nn.precise_bn import update_bn_stats

from bncorrect.recalibration import recalibrate_stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resnet_like()
    x = torch.randn(args.examples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b = args.b
    fv_batches = [x[i : i + b] for i in range(0, args.examples, b)]
    our_batches = [(x[i : i + 64],) for i in range(0, args.examples, 64)]
    result: dict[str, object] = {}

    def fvcore_run() -> None:
        m = copy.deepcopy(model).train()
        update_bn_stats(m, fv_batches, num_iters=len(fv_batches))
        result["fvcore"] = m

    def ours_train() -> None:
        result["ours"] = recalibrate_stats(model, our_batches, upstream="train", batch_size=b)

    def ours_eval() -> None:
        recalibrate_stats(model, our_batches, upstream="eval")

    med = interleaved({"fvcore": fvcore_run, "train": ours_train, "eval": ours_eval}, args.repeats)
    ref = result["fvcore"]
    ours = result["ours"]
    worst = 0.0
    for name, (mean, var) in ours.stats.items():  # type: ignore[attr-defined]
        bn = ref.get_submodule(name)  # type: ignore[attr-defined]
        worst = max(
            worst, float((mean - bn.running_mean).abs().max()), float((var - bn.running_var).abs().max())
        )
    print(f"machine: {machine()}")
    print(
        f"ResNet-style net, 20 BN layers, {args.examples} examples of 3x32x32, B = {b}, {args.repeats} reps"
    )
    print(f"  fvcore update_bn_stats (batches of B)     {med['fvcore']:7.3f} s")
    for key in ("train", "eval"):
        ratio = med[key] / med["fvcore"]
        print(f"  bncorrect recalibrate --upstream {key:5s}    {med[key]:7.3f} s   ratio {ratio:.2f}")
    print(f"  max |difference| of the statistics, train mode vs fvcore: {worst:.2e}")


if __name__ == "__main__":
    main()

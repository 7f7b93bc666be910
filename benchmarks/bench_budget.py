"""``--latency-budget`` (bncorrect.latency), measured: what its scoring costs and what its selection chooses.

1. ``cost``: the scoring work of one plan (the plain graph, the full correction, each leave-one-out subset
   and the frontier points the plan then measures) done three ways, on the same subsets: the onnxruntime
   sweep graph of ``bncorrect.onnx_passes.sweep_onnx`` on the plain export, one session fed every subset
   as a candidate (what ``plan_budget`` is given now); one rewritten graph and one onnxruntime session per
   subset (what it did before, 2L + 3 sessions and passes); the PyTorch sweep with every subset stacked as
   a candidate (the stacking of ``sweep-alpha``). Interleaved rounds, median of the per-round ratios to
   the per-graph scheme, and the largest metric difference between the three.
2. ``selection``: per-layer gains and costs measured once (real onnxruntime timing), then for each budget R
   the subset plain greedy by gain per cost picks (its longest prefix with additive ratio <= R) and the one
   the exact additive frontier picks, both measured as real graphs (their metric on the data, their
   latency ratios in one interleaved timing run).

Cases: the committed samples (sweep-alpha's chosen global alpha, ``-B 2``) and benchmarks/common.py's
ResNet- and MobileNet-style nets with random inputs and labels drawn from their alpha = 0.5 corrected
predictions (so that corrections help), alpha = 0.1 on every layer.

    python benchmarks/bench_budget.py [--part cost,selection] [--repeats 3] [--threads 2] [--examples 256]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import mobilenet_like, resnet_like

import bncorrect
from bncorrect import api
from bncorrect.budget import LayerOption, budget_curve, pareto_front, select_within_budget
from bncorrect.latency import measure_ratios, plan_budget, subset_graph, sweep_scorer
from bncorrect.layers import correct_model
from bncorrect.onnx_export import export_plain
from bncorrect.onnx_passes import sweep_onnx
from bncorrect.onnx_rewrite import match_layers
from bncorrect.sweep import sweep_alpha as torch_sweep

ROOT = Path(__file__).resolve().parents[1]


def host() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    simd = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    if simd == "AVX-512" and "avx2" in flags:
        simd = "AVX2 + AVX-512"
    import onnxruntime as ort

    return (
        f"{model} ({simd}), {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}"
    )


class Case:
    """A model, its labelled batches, and the correction to budget (per-layer alpha = beta)."""

    def __init__(self, name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float):
        self.name, self.model, self.alpha = name, model.eval(), alpha
        self.batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
        self.n = len(x)
        self.plain = export_plain(copy.deepcopy(self.model), x[:64])
        names = [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)
        ]
        self.node = match_layers(self.plain, names)
        self.names = names
        self.coef = dict.fromkeys(names, torch.tensor(alpha))
        self.example = x[:64].numpy()

    def graph(self, subset: Sequence[str]) -> onnx.ModelProto:
        on = {self.node[n]: self.coef[n] for n in subset}
        return subset_graph(self.plain, on, on, {}, list(on))

    def torch_scorer(self) -> Callable[[Sequence[tuple[str, ...]]], list[float]]:
        """The PyTorch sweep, every subset stacked as a candidate."""
        run = lambda c: torch_sweep(self.model, self.batches, [], extra_candidates=c)  # noqa: E731
        return sweep_scorer(run, self.coef, self.coef, None, "nll")

    def onnx_scorer(self) -> Callable[[Sequence[tuple[str, ...]]], list[float]]:
        """What ``--latency-budget`` uses: the onnxruntime sweep graph on the plain export, one session."""
        coef = {self.node[n]: v for n, v in self.coef.items()}
        run = lambda c: sweep_onnx(self.plain, self.batches, [], extra_candidates=c, device="cpu")  # noqa: E731
        score = sweep_scorer(run, coef, coef, None, "nll")
        return lambda subsets: score([tuple(self.node[n] for n in s) for s in subsets])

    def graph_scorer(self) -> Callable[[Sequence[tuple[str, ...]]], list[float]]:
        """The scheme before: one rewritten graph and one session per subset, run over all the data."""
        import onnxruntime as ort

        def score(subsets: Sequence[tuple[str, ...]]) -> list[float]:
            out = []
            for s in subsets:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                sess = ort.InferenceSession(
                    self.graph(s).SerializeToString(), so, providers=["CPUExecutionProvider"]
                )
                name = sess.get_inputs()[0].name
                total = 0.0
                for x, y in self.batches:
                    logits = torch.from_numpy(sess.run(None, {name: x.numpy()})[0]).double()
                    total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                out.append(total / self.n)
            return out

        return score


def node_ratio(plain, graphs, x):
    return [len(g.graph.node) / len(plain.graph.node) for g in graphs]


def sample_case(name: str) -> Case:
    model = bncorrect.load(ROOT / "sample_checkpoints" / name / "model.pt")
    data = np.load(ROOT / "sample_checkpoints" / name / "val.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    alpha = api.sweep_alpha(model, (x, y), train_batch_size=2, device="cpu").report["sweep"].best.alpha
    return Case(name, model, x, y, float(alpha))


def synthetic_case(name: str, model: torch.nn.Module, n: int = 512) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    with torch.no_grad():
        probs = correct_model(copy.deepcopy(model), 0.5).eval()(x).mul(3).softmax(1)
    y = torch.multinomial(probs, 1, generator=g)[:, 0]
    return Case(name, model, x, y, 0.1)


def cost_part(cases: list[Case], repeats: int, torch_cases: set[str]) -> None:
    print(
        "\n| case | BN layers | examples | subsets | onnxruntime sweep graph / per-graph sessions | "
        "stacked PyTorch sweep / per-graph sessions | largest metric difference |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        plan = plan_budget(
            case.names, case.onnx_scorer(), case.graph, case.example, "nll", 1.5, latency=node_ratio
        )
        subsets = list(plan.metric_of)
        jobs = {"onnx": case.onnx_scorer, "graphs": case.graph_scorer}
        if case.name in torch_cases:
            jobs["torch"] = case.torch_scorer
        ratios: dict[str, list[float]] = {k: [] for k in jobs}
        values = {}
        for r in range(repeats):
            seconds = {}
            for label in list(jobs)[r % len(jobs) :] + list(jobs)[: r % len(jobs)]:
                scorer = jobs[label]()
                t0 = time.perf_counter()
                values[label] = scorer(subsets)
                seconds[label] = time.perf_counter() - t0
            for label in jobs:
                ratios[label].append(seconds[label] / seconds["graphs"])
        diff = max(abs(a - b) for v in values.values() for a, b in zip(v, values["graphs"], strict=True))
        med = {k: f"{statistics.median(v):.2f}x" for k, v in ratios.items()}
        print(
            f"| {case.name} | {len(case.names)} | {case.n} | {len(subsets)} | {med['onnx']} | "
            f"{med.get('torch', 'not run')} | {diff:.1e} |"
        )


def selection_part(cases: list[Case], budgets: Sequence[float]) -> None:
    print("\n| case | R | greedy: layers, metric, measured ratio | exact: layers, metric, measured ratio |")
    print("|---|---|---|---|")
    for case in cases:
        plan = plan_budget(case.names, case.onnx_scorer(), case.graph, case.example, "nll", max(budgets))
        options = [LayerOption(n, plan.gains[n], plan.costs[n]) for n in plan.layers]
        greedy_curve = budget_curve(options)
        front = pareto_front(options).points
        picks = {}
        for r in budgets:
            g = [p for p in greedy_curve if p.ratio <= r][-1]
            e = select_within_budget(front, r)
            picks[r] = (g.layers, e.layers)
        subsets = sorted({s for pair in picks.values() for s in pair if s}, key=len)
        metric = dict(zip(subsets, case.onnx_scorer()(subsets), strict=True)) if subsets else {}
        metric[()] = plan.metric_of[()]
        measured = dict(
            zip(
                subsets,
                measure_ratios(case.graph(()), [case.graph(s) for s in subsets], case.example),
                strict=True,
            )
        )
        measured[()] = 1.0
        for r, (g, e) in picks.items():
            cell = lambda s, m=metric, q=measured: f"{len(s)}, {m[s]:.4f}, {q[s]:.2f}"  # noqa: E731
            same = " (same)" if g == e else ""
            print(f"| {case.name} | {r:g} | {cell(g)} | {cell(e)}{same} |")
        print(
            f"| {case.name} | plain | 0, {metric[()]:.4f}, 1.00 | full: {len(plan.layers)}, "
            f"{plan.full_metric:.4f}, {plan.full_ratio:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="cost,selection")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="1.1,1.2,1.3,1.5,2")
    parser.add_argument("--examples", type=int, default=256, help="examples of the synthetic cases")
    parser.add_argument(
        "--torch-all", action="store_true", help="time the stacked PyTorch sweep on every case"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"host: {host()}; {time.strftime('%Y-%m-%d %H:%M')}, load average {load}")
    cases = [
        sample_case("mnist1d_b2"),
        sample_case("digits_b2"),
        synthetic_case("resnet-style", resnet_like(16), args.examples),
        synthetic_case("mobilenet-style", mobilenet_like(16), args.examples),
    ]
    parts = args.part.split(",")
    if "cost" in parts:
        cost_part(
            cases, args.repeats, {c.name for c in cases} if args.torch_all else {"mnist1d_b2", "digits_b2"}
        )
    if "selection" in parts:
        selection_part(cases, [float(b) for b in args.budgets.split(",")])


if __name__ == "__main__":
    main()

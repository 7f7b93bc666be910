"""--latency-budget on sweep-alpha and tune: the selection through the API with an injected cost model (the
node count of each graph over the plain one's, so no timing), the gains and every measured point against a
direct evaluation (torch, or onnxruntime on the rewritten graph), the measured set against the additive
Pareto frontier found by brute force, the written graph against the model corrected on exactly the chosen
layers, an ONNX sample as sweep-alpha's input, segmentation (pixel-nll, miou), the real onnxruntime timing
run at R = 10 and R = 1 (no timing assertions), the plan's fall-back and pass count with a toy scorer, the
refusals, and the CLI."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import bncorrect
from bncorrect import api
from bncorrect.errors import NumericalError, UsageError
from bncorrect.latency import plan_budget, sweep_scorer
from bncorrect.layers import correct_model, corrected_layers
from bncorrect.onnx_export import export_plain
from bncorrect.onnx_rewrite import match_layers, rewrite
from bncorrect.sweep import sweep_alpha as torch_sweep

from . import toys
from .test_sweep_segmentation import IGNORE, K, OutOnly, make_data, seg_net

ALPHAS = [0.0, 0.1, 0.3]
SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem():
    """conv_net (3 BN layers) and labels sampled from its alpha = 0.5 corrected predictions, so that a
    correction helps (the sweep chooses alpha = 0.1 on them)."""
    model = toys.conv_net()
    x, _ = toys.data(200)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        probs = api.weight(model, 0.5).model(x).mul(3).softmax(1)
    y = torch.multinomial(probs, 1, generator=g)[:, 0]
    return model, x, y


def node_ratio(plain, graphs, x):
    """The toy cost model: a graph's node count over the plain graph's."""
    return [len(g.graph.node) / len(plain.graph.node) for g in graphs]


def ort_run(path_or_proto, x, output=0):
    src = path_or_proto if isinstance(path_or_proto, str | Path) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(
        str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[output]


def torch_with(model, alpha, layers):
    """The model with alpha = beta = ``alpha`` on ``layers`` only (the others plain), straight in torch."""
    work = correct_model(copy.deepcopy(model), alpha)
    for name, m in corrected_layers(work).items():
        if name not in layers:
            m.alpha.zero_()
            m.beta.zero_()
    return work.eval()


def nll(logits, y):
    return float(F.cross_entropy(torch.as_tensor(logits).double(), y))


def subsets(names):
    return [s for k in range(len(names) + 1) for s in itertools.combinations(names, k)]


def additive_front(plan):
    """The Pareto-optimal subsets of the layers with positive gain under the additive model, by brute force
    over all subsets (the plain graph always included)."""
    helpful = [n for n in plan.layers if plan.gains[n] > 0]
    scored = [(sum(plan.costs[n] for n in s), sum(plan.gains[n] for n in s), s) for s in subsets(helpful)]
    front = {()}
    for c, g, s in scored:
        if not any(c2 <= c + 1e-12 and g2 > g + 1e-12 for c2, g2, _ in scored):
            front.add(s)
    return front


def is_plain(path, model, x):
    """The graph is the plain export of ``model``: the same ops, its 3 BatchNormalization nodes kept."""
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    plain = [n.op_type for n in export_plain(copy.deepcopy(model), x[:2]).graph.node]
    return sorted(ops) == sorted(plain) and ops.count("BatchNormalization") == 3


def check_file(path):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto


# ------------------------------------------------------------------------------ PyTorch model, toy costs
def test_toy_cost_model_measures_the_exact_frontier_and_writes_the_best_point(problem, tmp_path):
    model, x, y = problem
    full = api.sweep_alpha(
        model,
        (x, y),
        alphas=ALPHAS,
        device="cpu",
        out=tmp_path / "all.onnx",
        latency_budget=100.0,
        latency_fn=node_ratio,
    )
    alpha = full.report["sweep"].best.alpha
    assert alpha == pytest.approx(0.1)
    plan = full.report["latency_budget"]
    names = ["1", "5", "10"]
    assert plan.layers == names and plan.passes == 2 and plan.selection == "exact" and plan.frontier_exact
    plain_proto = export_plain(copy.deepcopy(model), x[:2])
    node = match_layers(plain_proto, names)
    with torch.no_grad():
        direct = {s: nll(torch_with(model, alpha, s)(x), y) for s in subsets(names)}
    # gains: leave-one-out nll, computed directly in torch
    for n in names:
        without = tuple(m for m in names if m != n)
        assert plan.gains[n] == pytest.approx(direct[without] - direct[tuple(names)], abs=2e-5)
    assert plan.full_metric == pytest.approx(direct[tuple(names)], abs=2e-5)
    # what was measured: exactly the additive Pareto frontier (brute force over subsets), each point's
    # metric the direct one and its ratio the toy cost of the graph that corrects exactly it
    assert {p.layers for p in plan.measured} == additive_front(plan)
    for p in plan.measured:
        assert plan.metric_of[p.layers] == pytest.approx(direct[p.layers], abs=2e-5)
        assert p.gain == pytest.approx(direct[()] - direct[p.layers], abs=2e-5)
        if p.layers:
            on = {node[n]: alpha for n in p.layers}
            graph = rewrite(plain_proto, on, on)[0]
            assert p.ratio == pytest.approx(node_ratio(plain_proto, [graph], None)[0])
    # the curve: the measured points' Pareto frontier, by ratio, each better than every cheaper one
    assert plan.curve[0].layers == () and plan.chosen in plan.curve
    assert all(b.ratio >= a.ratio and b.gain > a.gain for a, b in itertools.pairwise(plan.curve))
    assert plan.chosen == max(plan.measured, key=lambda p: (p.gain, -p.ratio)) == plan.curve[-1]
    assert len(plan.curve) >= 3
    for k in (1, len(plan.curve) - 1):  # the cheapest corrected point of the curve, and the best (R = 100)
        point = plan.curve[k]
        if k == len(plan.curve) - 1:
            out, got = tmp_path / "all.onnx", plan
        else:
            budget = point.ratio  # exactly this point fits among the frontier's
            out = tmp_path / f"k{k}.onnx"
            got = api.sweep_alpha(
                model,
                (x, y),
                alphas=ALPHAS,
                device="cpu",
                out=out,
                latency_budget=budget,
                latency_fn=node_ratio,
            ).report["latency_budget"]
            fits = [p for p in got.measured if p.ratio <= budget]
            assert got.chosen == max(fits, key=lambda p: (p.gain, -p.ratio))
        assert got.chosen.layers == point.layers
        written = check_file(out)
        assert len(written.graph.node) / len(plain_proto.graph.node) == pytest.approx(point.ratio)
        assert not is_plain(out, model, x)
        with torch.no_grad():
            want = torch_with(model, alpha, point.layers)(x).numpy()
        logits = ort_run(out, x)
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
        assert got.metrics[k] == pytest.approx(nll(logits, y), abs=1e-5)


def test_greedy_selection_measures_the_prefixes(problem, tmp_path):
    model, x, y = problem
    plan = api.sweep_alpha(
        model,
        (x, y),
        alphas=ALPHAS,
        device="cpu",
        out=tmp_path / "g.onnx",
        latency_budget=100.0,
        latency_fn=node_ratio,
        budget_selection="greedy",
    ).report["latency_budget"]
    positive = [n for n in plan.layers if plan.gains[n] > 0]
    order = sorted(positive, key=lambda n: -plan.gains[n] / plan.costs[n])
    assert [p.layers for p in plan.measured] == [tuple(order[:k]) for k in range(len(order) + 1)]
    with pytest.raises(UsageError, match="selection"):
        api.sweep_alpha(
            model, (x, y), alphas=ALPHAS, out=tmp_path / "h.onnx", latency_budget=2.0, budget_selection="best"
        )


# ------------------------------------------------------------------------ the plan with a toy scorer
def tagged(subset):
    """A stand-in graph that says which layers it corrects (for toy cost models that read it)."""
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    proto.doc_string = ",".join(subset)
    return proto


def test_plan_falls_back_when_the_additive_optimum_measures_over_budget():
    """Gains additive; a and b each cost 0.1 alone, together 0.3 (they do not share their overhead): the
    additive optimum within 1.2, {a, b}, measures 1.3, and the best measured point within budget is {a}.
    Two scoring calls (leave-one-out, then the unscored frontier points), two timing runs."""
    gain = {"a": 0.3, "b": 0.2, "c": 0.05}
    cost = {"a": 0.1, "b": 0.1, "c": 0.15}
    calls: list[list[tuple[str, ...]]] = []

    def score(subs):
        calls.append(list(subs))
        return [1.0 - sum(gain[n] for n in s) for s in subs]  # an nll: lower is better

    def ratio(s):
        extra = 0.1 if {"a", "b"} <= set(s) else 0.0
        return 1.0 + sum(cost[n] for n in s) + extra

    timings = []

    def latency(plain, graphs, x):
        timings.append(len(graphs))
        return [ratio([n for n in g.doc_string.split(",") if n]) for g in graphs]

    plan = plan_budget(
        ["a", "b", "c"], score, tagged, np.zeros((2, 3), np.float32), "nll", 1.2, latency=latency
    )
    assert plan.gains == pytest.approx(gain) and plan.costs == pytest.approx(cost)
    assert len(calls) == 2 and plan.passes == 2 and len(timings) == 2 and plan.timing_runs == 2
    assert calls[0][:2] == [(), ("a", "b", "c")] and set(calls[0][2:]) == {("b", "c"), ("a", "c"), ("a", "b")}
    assert ("a", "b") not in calls[1]  # scored in the leave-one-out pass already
    ab = next(p for p in plan.measured if p.layers == ("a", "b"))
    assert ab.ratio == pytest.approx(1.3) and ab.gain == pytest.approx(0.5)
    assert plan.chosen.layers == ("a",)
    assert plan.metric_of[("a",)] == pytest.approx(0.7)
    # a higher-is-better metric (top1): gains keep their sign
    acc = plan_budget(
        ["a", "b", "c"],
        lambda subs: [0.5 + sum(gain[n] for n in s) for s in subs],
        tagged,
        np.zeros((2, 3), np.float32),
        "top1",
        1.5,
        latency=latency,
    )
    assert acc.gains == pytest.approx(gain) and set(acc.chosen.layers) == {"a", "b", "c"}


def test_plan_refuses_nonfinite_leave_one_out():
    def score(subs):
        return [float("nan") if s == ("b",) else 1.0 for s in subs]

    with pytest.raises(NumericalError, match="NaN/Inf"):
        plan_budget(["a", "b"], score, tagged, np.zeros((1, 1), np.float32), "nll", 1.5, latency=node_ratio)


# -------------------------------------------------------------------------------- an ONNX model as input
def test_onnx_sample_as_sweep_alpha_input(tmp_path, cli):
    """The mnist1d_b2 sample exported with its BN nodes kept, swept with --latency-budget in onnxruntime:
    gains and every measured point against graphs rewritten directly and run in onnxruntime; the written
    graph is exactly the chosen layers' rewrite; the CLI run with real timing passes checker and runs."""
    n = 300
    model = bncorrect.load(SAMPLES / "mnist1d_b2" / "model.pt")
    data = np.load(SAMPLES / "mnist1d_b2" / "val.npz")
    x, y = torch.from_numpy(data["x"][:n]), torch.from_numpy(data["y"][:n])
    path = tmp_path / "plain.onnx"
    onnx.save(export_plain(model, x[:2]), str(path))
    npz = tmp_path / "val.npz"
    np.savez(npz, x=x.numpy(), y=y.numpy())
    out = tmp_path / "budget.onnx"
    outcome = api.sweep_alpha(
        path, npz, alphas=[0.0, 0.1, 0.3], device="cpu", out=out, latency_budget=2.0, latency_fn=node_ratio
    )
    plan, alpha = outcome.report["latency_budget"], outcome.report["sweep"].best.alpha
    assert alpha > 0 and len(plan.layers) == 4
    plain = onnx.load(str(path))

    def direct(layers):
        graph = rewrite(plain, dict.fromkeys(layers, alpha), dict.fromkeys(layers, alpha))[0]
        return nll(ort_run(graph, x), y), graph

    full, _ = direct(plan.layers)
    for name in plan.layers:
        without, _ = direct([m for m in plan.layers if m != name])
        assert plan.gains[name] == pytest.approx(without - full, abs=1e-6)
    assert {p.layers for p in plan.measured} == additive_front(plan)
    for p in plan.measured:
        value, graph = direct(p.layers)
        assert plan.metric_of[p.layers] == pytest.approx(value, abs=1e-6)
        assert p.ratio == pytest.approx(node_ratio(plain, [graph], None)[0])
    fits = [p for p in plan.measured if p.ratio <= 2.0]
    assert plan.chosen == max(fits, key=lambda p: (p.gain, -p.ratio)) and plan.chosen.layers
    written = check_file(out)
    _, want = direct(plan.chosen.layers)
    np.testing.assert_allclose(ort_run(written, x), ort_run(want, x), rtol=1e-5, atol=1e-6)
    # the CLI on the ONNX file, real timing (no assertion on times)
    res = cli("sweep-alpha", path, "--data", npz, "--alphas", "0,0.1,0.3", "-o", tmp_path / "cli.onnx",
              "--latency-budget", "10", "--json")  # fmt: skip
    assert res.code == 0, res.err
    report = json.loads(res.out)["latency_budget"]
    check_file(tmp_path / "cli.onnx")
    got = {ly["name"]: ly["gain"] for ly in report["layers"]}
    assert got == pytest.approx(plan.gains, abs=1e-9)  # gains do not depend on the timing
    chosen = report["selected"]
    _, want = direct(chosen)
    np.testing.assert_allclose(ort_run(tmp_path / "cli.onnx", x), ort_run(want, x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- segmentation
def seg_metrics(logits, y):
    """pixel-nll, miou, pixel-acc the obvious way (classes present in targets or predictions)."""
    logits = torch.as_tensor(logits).double()
    valid = y != IGNORE
    value = F.cross_entropy(logits, torch.where(valid, y, 0), reduction="none")[valid].mean().item()
    pred = logits.argmax(1)
    ious = []
    for c in range(K):
        tp = int(((pred == c) & (y == c) & valid).sum())
        union = int((((pred == c) | (y == c)) & valid).sum())
        if union:
            ious.append(tp / union)
    acc = (pred == y)[valid].double().mean().item()
    return {"pixel-nll": value, "miou": sum(ious) / len(ious), "pixel-acc": acc}


@pytest.mark.parametrize("metric", ["pixel-nll", "miou"])
def test_segmentation_budget_on_pytorch_and_onnx(tmp_path, metric):
    model = seg_net(0)
    x, y = make_data(24)
    names = ["body.1", "body.4"]
    alphas = [0.0, 0.2, 0.5]
    out = tmp_path / "seg.onnx"
    outcome = api.sweep_alpha(
        model,
        (x, y),
        alphas=alphas,
        metric=metric,
        output_key="out",
        device="cpu",
        out=out,
        latency_budget=100.0,
        latency_fn=node_ratio,
    )
    plan, alpha = outcome.report["latency_budget"], outcome.report["sweep"].best.alpha
    assert plan.metric == metric and plan.layers == names and alpha > 0
    with torch.no_grad():
        direct = {s: seg_metrics(torch_with(model, alpha, s)(x)["out"], y)[metric] for s in subsets(names)}
    sign = 1.0 if metric == "pixel-nll" else -1.0  # gains: improvement of the metric
    for n in names:
        without = tuple(m for m in names if m != n)
        assert plan.gains[n] == pytest.approx(sign * (direct[without] - direct[tuple(names)]), abs=1e-6)
    for p in plan.measured:
        assert plan.metric_of[p.layers] == pytest.approx(direct[p.layers], abs=1e-6)
    written = check_file(out)
    with torch.no_grad():
        want = torch_with(model, alpha, plan.chosen.layers)(x)["out"].numpy()
    outputs = [o.name for o in written.graph.output]
    np.testing.assert_allclose(ort_run(out, x, output=0), want, rtol=1e-4, atol=1e-5)
    assert len(outputs) == 2  # the dict's two heads
    # the same model as an ONNX graph of its per-pixel logits: scored by the onnxruntime sweep graph
    path = tmp_path / "seg_in.onnx"
    onnx.save(export_plain(OutOnly(model), x[:2]), str(path))
    oplan = api.sweep_alpha(
        path,
        (x, y),
        alphas=alphas,
        metric=metric,
        device="cpu",
        out=tmp_path / "seg_out.onnx",
        latency_budget=100.0,
        latency_fn=node_ratio,
    ).report["latency_budget"]
    assert len(oplan.layers) == 2
    check_file(tmp_path / "seg_out.onnx")
    plain = onnx.load(str(path))
    for p in oplan.measured:
        graph = rewrite(plain, dict.fromkeys(p.layers, alpha), dict.fromkeys(p.layers, alpha))[0]
        assert oplan.metric_of[p.layers] == pytest.approx(seg_metrics(ort_run(graph, x), y)[metric], abs=1e-5)


def test_segmentation_is_refused_where_the_caller_does_not_score_it():
    """tune's side (segmentation=False, its current contract): the scorer refuses per-pixel outputs."""
    model = seg_net(0)
    x, y = make_data(8)
    score = sweep_scorer(
        lambda cands: torch_sweep(model, [(x, y)], [], extra_candidates=cands, output_key="out"),
        {"body.1": 0.2},
        {"body.1": 0.2},
        None,
        "nll",
    )
    with pytest.raises(UsageError, match="classification logits"):
        score([(), ("body.1",)])


# ------------------------------------------------------------------------------------------ refusals
def test_refusals(problem, tmp_path):
    model, x, y = problem
    with pytest.raises(UsageError, match="forward_fn"):
        api.sweep_alpha(
            model,
            (x, y),
            alphas=ALPHAS,
            out=tmp_path / "f.onnx",
            latency_budget=1.5,
            forward_fn=lambda m, b: m(b[0]),
        )
    once = iter([(x[:100], y[:100]), (x[100:], y[100:])])
    with pytest.raises(UsageError, match="read only once"):
        api.sweep_alpha(model, once, alphas=ALPHAS, device="cpu", out=tmp_path / "o.onnx", latency_budget=1.5)
    assert not (tmp_path / "f.onnx").exists() and not (tmp_path / "o.onnx").exists()
    with pytest.raises(UsageError, match="nll, top1, top5"):  # tune: classification metrics only
        api.tune(model, (x, y), 2, out=tmp_path / "t.onnx", latency_budget=1.5, metric="miou")


# ------------------------------------------------------------------------------------ real timing, tune
def test_real_timing_budget_ten_and_one(problem, tmp_path):
    """onnxruntime measures the costs (no assertion on times): R = 10 writes the best measured point, R = 1
    none, and both files pass onnx.checker and run in onnxruntime."""
    model, x, y = problem
    big, one = tmp_path / "r10.onnx", tmp_path / "r1.onnx"
    o10 = api.sweep_alpha(model, (x, y), alphas=ALPHAS, device="cpu", out=big, latency_budget=10.0)
    o1 = api.sweep_alpha(model, (x, y), alphas=ALPHAS, device="cpu", out=one, latency_budget=1.0)
    p10, p1 = o10.report["latency_budget"], o1.report["latency_budget"]
    fits = [p for p in p10.measured if p.ratio <= 10.0]
    assert p10.chosen == max(fits, key=lambda p: (p.gain, -p.ratio))
    assert all(p10.gains[n] > 0 for n in p10.selected)
    assert p1.selected == [] and is_plain(one, model, x)
    for path in (big, one):
        check_file(path)
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(one, x), model(x).numpy(), rtol=1e-4, atol=1e-5)
        want = torch_with(model, 0.1, p10.selected)(x).numpy()
    np.testing.assert_allclose(ort_run(big, x), want, rtol=1e-4, atol=1e-5)


def test_tune_scores_on_the_heldout_part(problem, tmp_path):
    model, x, y = problem
    out = tmp_path / "tuned.onnx"
    outcome = api.tune(
        model, (x, y), 2, device="cpu", max_epochs=3, out=out, latency_budget=100.0, latency_fn=node_ratio
    )
    plan, result = outcome.report["latency_budget"], outcome.report["tune"]
    idx = torch.tensor(result.heldout_indices)
    logits = ort_run(out, x[idx])
    check_file(out)
    assert plan.metric_of[plan.chosen.layers] == pytest.approx(nll(logits, y[idx]), abs=1e-5)
    with torch.no_grad():
        alpha = {n: lc.alpha for n, lc in outcome.corrections.layers.items()}
        beta = {n: lc.beta for n, lc in outcome.corrections.layers.items()}
        want = correct_model(copy.deepcopy(model), alpha, beta).eval()(x[idx]).numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert set(plan.selected) == {
        n for n, lc in outcome.corrections.layers.items() if bool(lc.alpha.any() or lc.beta.any())
    }
    assert outcome.corrections.metrics["latency_budget"]["selected"] == plan.summary()["selected"]


def test_cli_json_table_and_plot(cli, tmp_path, problem):
    model, x, y = problem
    ckpt, data = tmp_path / "m.pt", tmp_path / "d.npz"
    torch.save(model.state_dict(), ckpt)
    np.savez(data, x=x.numpy(), y=y.numpy())
    arch = f"{toys.__file__}:conv_net"
    args = ["sweep-alpha", ckpt, "--arch", arch, "--data", data, "--alphas", "0,0.1,0.3"]
    res = cli(*args, "-o", tmp_path / "a.onnx", "--latency-budget", "10", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)["latency_budget"]
    assert report["budget"] == 10 and report["curve"][0]["layers"] == [] and report["passes"] == 2
    assert report["selection"] == "exact" and len(report["measured"]) >= len(report["curve"])
    assert (tmp_path / "a.onnx").exists()
    png = tmp_path / "curve.png"
    res = cli(*args, "-o", tmp_path / "b.onnx", "--latency-budget", "1", "--budget-plot", png)
    assert res.code == 0, res.err
    assert "latency ratio" in res.out and "0 of 3 corrected layers kept" in res.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert is_plain(tmp_path / "b.onnx", model, x)

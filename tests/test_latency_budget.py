"""--latency-budget on sweep-alpha and tune: the selection through the API with an injected cost model (the
node count of each graph over the plain one's, so no timing), the gains against a direct leave-one-out
evaluation in torch, the written graph against the torch model corrected on exactly the chosen layers,
the real onnxruntime timing run at R = 10 and R = 1 (no timing assertions), and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from bncorrect import api
from bncorrect.layers import correct_model, corrected_layers
from bncorrect.onnx_export import export_plain

from . import toys

ALPHAS = [0.0, 0.1, 0.3]


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


def ort_run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


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


def is_plain(path, model, x):
    """The graph is the plain export of ``model``: the same ops, its 3 BatchNormalization nodes kept."""
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    plain = [n.op_type for n in export_plain(copy.deepcopy(model), x[:2]).graph.node]
    return sorted(ops) == sorted(plain) and ops.count("BatchNormalization") == 3


def test_toy_cost_model_selects_the_longest_greedy_prefix_within_budget(problem, tmp_path):
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
    assert plan.layers == names
    # gains: leave-one-out held-out nll, computed directly in torch
    with torch.no_grad():
        all_nll = nll(torch_with(model, alpha, names)(x), y)
        for n in names:
            without = nll(torch_with(model, alpha, [m for m in names if m != n])(x), y)
            assert plan.gains[n] == pytest.approx(without - all_nll, abs=2e-5)
    # order: positive gains only, by gain per cost (the costs are the toy model's)
    positive = [n for n in names if plan.gains[n] > 0]
    order = sorted(positive, key=lambda n: -plan.gains[n] / plan.costs[n])
    assert [p.layers for p in plan.curve] == [tuple(order[:k]) for k in range(len(order) + 1)]
    assert plan.selected == order  # a budget of 100 takes every helpful layer
    plain_nodes = len(export_plain(copy.deepcopy(model), x[:2]).graph.node)
    for k, point in enumerate(plan.curve):
        if k == 0:
            continue
        budget = point.ratio  # exactly the k-th prefix fits, the next does not
        out = tmp_path / f"k{k}.onnx"
        got = api.sweep_alpha(
            model, (x, y), alphas=ALPHAS, device="cpu", out=out, latency_budget=budget, latency_fn=node_ratio
        ).report["latency_budget"]
        assert got.selected == order[:k]
        written = onnx.load(str(out))
        onnx.checker.check_model(written)
        assert len(written.graph.node) / plain_nodes == pytest.approx(budget)  # the toy ratio of the file
        assert not is_plain(out, model, x)
        with torch.no_grad():
            want = torch_with(model, alpha, order[:k])(x).numpy()
        logits = ort_run(out, x)
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
        assert got.metrics[k] == pytest.approx(nll(logits, y), abs=1e-5)


def test_real_timing_budget_ten_and_one(problem, tmp_path):
    """onnxruntime measures the costs (no assertion on times): R = 10 keeps every helpful layer, R = 1 none,
    and both files pass onnx.checker and run in onnxruntime."""
    model, x, y = problem
    big, one = tmp_path / "r10.onnx", tmp_path / "r1.onnx"
    o10 = api.sweep_alpha(model, (x, y), alphas=ALPHAS, device="cpu", out=big, latency_budget=10.0)
    o1 = api.sweep_alpha(model, (x, y), alphas=ALPHAS, device="cpu", out=one, latency_budget=1.0)
    p10, p1 = o10.report["latency_budget"], o1.report["latency_budget"]
    assert set(p10.selected) == {n for n in p10.layers if p10.gains[n] > 0}
    assert p1.selected == [] and is_plain(one, model, x)
    for path in (big, one):
        onnx.checker.check_model(onnx.load(str(path)))
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(one, x), model(x).numpy(), rtol=1e-4, atol=1e-5)
        want = torch_with(model, 0.1, p10.selected)(x).numpy()
    np.testing.assert_allclose(ort_run(big, x), want, rtol=1e-4, atol=1e-5)
    # every helpful layer corrected is the no-budget output once the harmful one is dropped too
    if set(p10.selected) == set(p10.layers):
        ref = tmp_path / "ref.onnx"
        api.sweep_alpha(model, (x, y), alphas=ALPHAS, device="cpu", out=ref)
        np.testing.assert_allclose(ort_run(big, x), ort_run(ref, x), rtol=1e-5, atol=1e-6)


def test_tune_scores_on_the_heldout_part(problem, tmp_path):
    model, x, y = problem
    out = tmp_path / "tuned.onnx"
    outcome = api.tune(
        model, (x, y), 2, device="cpu", max_epochs=3, out=out, latency_budget=100.0, latency_fn=node_ratio
    )
    plan, result = outcome.report["latency_budget"], outcome.report["tune"]
    idx = torch.tensor(result.heldout_indices)
    logits = ort_run(out, x[idx])
    onnx.checker.check_model(onnx.load(str(out)))
    assert plan.metrics[plan.curve.index(plan.chosen)] == pytest.approx(nll(logits, y[idx]), abs=1e-5)
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
    assert report["budget"] == 10 and report["curve"][0]["layers"] == []
    assert (tmp_path / "a.onnx").exists()
    png = tmp_path / "curve.png"
    res = cli(*args, "-o", tmp_path / "b.onnx", "--latency-budget", "1", "--budget-plot", png)
    assert res.code == 0, res.err
    assert "latency ratio" in res.out and "0 of 3 corrected layers kept" in res.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert is_plain(tmp_path / "b.onnx", model, x)

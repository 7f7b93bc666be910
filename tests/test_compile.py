"""The corrected layer under torch.compile: one graph (no graph break at the corrected layers), the same
values as the float64 loop reference, and coefficients changed after compiling (set_coefficients,
load_state_dict) are honoured.

Dynamo's ``eager`` backend traces exactly what inductor receives, in seconds; inductor itself is measured
in ``benchmarks/bench_compile.py`` (its C++ compilation takes minutes on a small host)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bncorrect.layers import CorrectedNorm, correct_model

from .reference import corrected_bn_reference


def _net() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g))
                m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
                m.weight.copy_(torch.rand(8, generator=g) + 0.5)
                m.bias.copy_(torch.randn(8, generator=g))
    return net.eval()


def _reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The corrected net in float64, every BN through the loop reference (DESIGN §2)."""
    h = x.double()
    for m in net:
        if isinstance(m, CorrectedNorm):
            bn = m.norm
            y = corrected_bn_reference(
                h.numpy(), bn.running_mean.double().numpy(), bn.running_var.double().numpy(),
                bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy(), bn.eps,
                m.alpha.double().numpy(), m.beta.double().numpy(),
            )  # fmt: skip
            h = torch.from_numpy(y)
        else:
            h = m.double()(h) if not isinstance(m, nn.ReLU) else torch.relu(h)
    return h


def test_no_graph_break_and_values_match_the_reference() -> None:
    net = correct_model(_net(), {"1": 0.3, "4": torch.linspace(0.0, 0.9, 8)}, {"1": 0.2, "4": 0.6})
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        got = compiled(x)
        ref = _reference(copy.deepcopy(net), x)
    assert (got.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_coefficient_changes_after_compiling_are_seen() -> None:
    plain = _net()
    net = correct_model(copy.deepcopy(plain), 0.0)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), plain(x))  # identity layers: the original BN, bit for bit
        for m in net.modules():
            if isinstance(m, CorrectedNorm):
                m.set_coefficients(0.5, 0.5)
        got = compiled(x)
        ref = _reference(copy.deepcopy(net), x)
        assert (got.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
        for m in net.modules():
            if isinstance(m, CorrectedNorm):
                m.set_coefficients(0.0, 0.0)
        assert torch.equal(compiled(x), plain(x))


def test_state_dict_load_after_compiling_is_seen() -> None:
    source = correct_model(_net(), 0.4)
    target = correct_model(_net(), 0.0)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    compiled = torch.compile(target, backend="eager")
    with torch.no_grad():
        compiled(x)
        target.load_state_dict(source.state_dict())
        got = compiled(x)
        ref = _reference(copy.deepcopy(source), x)
    assert (got.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())

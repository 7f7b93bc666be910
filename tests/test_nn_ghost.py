from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect.errors import UsageError
from bncorrect.nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

from .bn_layers import randomize_bn

CASES = {
    "1d-2d-input": (nn.BatchNorm1d, GhostBatchNorm1d, (8, 3)),
    "1d-3d-input": (nn.BatchNorm1d, GhostBatchNorm1d, (8, 3, 5)),
    "2d": (nn.BatchNorm2d, GhostBatchNorm2d, (8, 3, 4, 5)),
    "3d": (nn.BatchNorm3d, GhostBatchNorm3d, (4, 3, 2, 3, 4)),
}


def _bn(cls: type[nn.Module], c: int, seed: int = 0, momentum: float | None = 0.1) -> nn.Module:
    bn = randomize_bn(cls(c, momentum=momentum).double(), seed)
    bn.num_batches_tracked.fill_(3)
    return bn


def _ghost_like(bn: nn.Module, ghost_cls: type[nn.Module], g: int, running_update: str = "per_step"):
    ghost = ghost_cls(bn.num_features, g, momentum=bn.momentum, running_update=running_update).double()
    ghost.load_state_dict(bn.state_dict())
    return ghost


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a per-channel offset and scale so the statistics are far from (0, 1)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 3.0
    return x


def _grads(module: nn.Module, xs: list[torch.Tensor], r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output (concatenated over chunks) and gradients of sum(y * r) w.r.t. x, weight, bias."""
    module.zero_grad()
    x = torch.cat(xs).clone().requires_grad_(True)
    ys = [module(chunk) for chunk in x.split([c.shape[0] for c in xs])]
    y = torch.cat(ys)
    (y * r).sum().backward()
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("running_update", ["per_step", "per_group"])
def test_group_equal_to_batch_is_batchnorm(case, running_update):
    bn_cls, ghost_cls, shape = CASES[case]
    bn = _bn(bn_cls, shape[1]).train()
    ghost = _ghost_like(bn, ghost_cls, shape[0], running_update).train()
    r = _input(shape, seed=5)
    for step in range(2):
        x = _input(shape, seed=10 + step)
        for a, b in zip(_grads(ghost, [x], r), _grads(bn, [x], r), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=0, atol=1e-12)
    assert int(ghost.num_batches_tracked) == int(bn.num_batches_tracked) == 5
    ghost.eval()
    bn.eval()
    x = _input(shape, seed=20)
    torch.testing.assert_close(ghost(x), bn(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batches_are_batchnorm_per_chunk(case, momentum):
    bn_cls, ghost_cls, shape = CASES[case]
    g = shape[0] // 2 if case != "1d-2d-input" else 4
    n = shape[0]
    k = n // g
    r = _input(shape, seed=5)
    start = _bn(bn_cls, shape[1], momentum=momentum).train()
    ghost = _ghost_like(start, ghost_cls, g, "per_step").train()
    seq_ghost = _ghost_like(start, ghost_cls, g, "per_group").train()
    ref = copy.deepcopy(start)  # one BN applied to each chunk in turn: outputs, grads, sequential updates
    for step in range(2):
        x = _input(shape, seed=10 + step)
        chunks = list(x.split(g))
        copies = [copy.deepcopy(ghost) for _ in range(k)]  # per-step reference: K BN copies, same state
        plain = [bn_cls(shape[1], momentum=momentum).double() for _ in range(k)]
        for p, c in zip(plain, copies, strict=True):
            p.load_state_dict(c.state_dict())
            p.train()
        expected = _grads(ref, chunks, r)
        for got in (_grads(ghost, [x], r), _grads(seq_ghost, [x], r)):
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        with torch.no_grad():
            for p, chunk in zip(plain, chunks, strict=True):
                p(chunk)
        mean_rm = torch.stack([p.running_mean for p in plain]).mean(0)
        mean_rv = torch.stack([p.running_var for p in plain]).mean(0)
        torch.testing.assert_close(ghost.running_mean, mean_rm, rtol=0, atol=1e-12)
        torch.testing.assert_close(ghost.running_var, mean_rv, rtol=0, atol=1e-12)
        torch.testing.assert_close(seq_ghost.running_mean, ref.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(seq_ghost.running_var, ref.running_var, rtol=0, atol=1e-12)
    assert int(ghost.num_batches_tracked) == 3 + 2
    assert int(seq_ghost.num_batches_tracked) == int(ref.num_batches_tracked) == 3 + 2 * k


def test_eval_is_batchnorm_with_running_stats():
    bn = _bn(nn.BatchNorm2d, 3)
    ghost = _ghost_like(bn, GhostBatchNorm2d, 2).eval()
    x = _input((5, 3, 4, 4))  # any batch size in eval mode
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(ghost(x), expected, rtol=0, atol=0)


def test_without_running_stats_eval_uses_ghost_statistics():
    ghost = GhostBatchNorm2d(3, 2, track_running_stats=False).double()
    x = _input((4, 3, 3, 3))
    y_train = ghost.train()(x)
    y_eval = ghost.eval()(x)
    torch.testing.assert_close(y_eval, y_train, rtol=0, atol=0)
    ref = torch.cat(
        [F.batch_norm(c, None, None, ghost.weight, ghost.bias, True, 0.0, ghost.eps) for c in x.split(2)]
    )
    torch.testing.assert_close(y_train, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case):
    _, ghost_cls, shape = CASES[case]
    shape = (4, 2, *(min(s, 3) for s in shape[2:]))  # small: gradcheck is one forward per input value
    ghost = ghost_cls(shape[1], 2).double().train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(ghost, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_float32_input_matches_double():
    ghost = GhostBatchNorm2d(3, 2).train()
    x = _input((4, 3, 5, 5))
    y32 = ghost(x.float())
    y64 = copy.deepcopy(ghost).double()(x)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=1e-5)


def test_batch_not_multiple_of_group_size():
    ghost = GhostBatchNorm2d(3, 4).train()
    with pytest.raises(UsageError, match="not a multiple of the ghost batch size 4"):
        ghost(torch.randn(6, 3, 2, 2))


def test_bad_arguments():
    with pytest.raises(UsageError, match="group_size"):
        GhostBatchNorm2d(3, 0)
    with pytest.raises(UsageError, match="running_update"):
        GhostBatchNorm2d(3, 2, running_update="sometimes")
    with pytest.raises(UsageError, match="expects 4D input"):
        GhostBatchNorm2d(3, 2)(torch.randn(4, 3, 5))
    with pytest.raises(UsageError, match="at least 2 are needed"):
        GhostBatchNorm1d(3, 1).train()(torch.randn(4, 3))  # one value per channel per ghost batch

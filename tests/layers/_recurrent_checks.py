"""Checks shared by the Birdie recurrent layer tests (gated SSM, Hawk)."""

import torch

from statelab.layers.protocol import Segments
from statelab.testing import assert_close


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def check_continuation(layer, T=21, split=8):
    """Full pass == prefix then suffix from the state == token by token (causal use)."""
    torch.manual_seed(0)
    x = torch.randn(2, T, layer.d_model)
    full, st = layer(x)
    a, s1 = layer(x[:, :split])
    b, s2 = layer(x[:, split:], s1)
    assert_close("prefix+suffix", full, torch.cat([a, b], 1))
    for i, (p, q) in enumerate(zip(_flat(st), _flat(s2), strict=True)):
        assert_close(f"state part {i}", p, q)
    s, ys = None, []
    for t in range(T):
        y, s = layer(x[:, t : t + 1], s)
        ys.append(y)
    assert_close("token by token", full, torch.cat(ys, 1))
    # the given state is not modified
    before = [t.clone() for t in _flat(s1)]
    layer(x[:, split:], s1)
    assert all(torch.equal(p, q) for p, q in zip(before, _flat(s1), strict=True))


def check_naive_equals_chunked(layer, T=37):
    torch.manual_seed(0)
    x = torch.randn(2, T, layer.d_model)
    _, s0 = layer(torch.randn(2, 5, layer.d_model))
    s0 = [t.detach().clone().requires_grad_() for t in _flat(s0)]
    st = tuple(s0) if len(s0) > 1 else s0[0]
    start = torch.zeros(2, T, dtype=torch.bool)
    start[1, 11] = True
    prefix = torch.zeros(2, T, dtype=torch.bool)
    prefix[:, :6] = True
    prefix[1, 11:20] = True
    outs = []
    for naive in (True, False):
        layer.zero_grad()
        for t in s0:
            t.grad = None
        layer.backend = "naive" if naive else "parallel"
        y, s = layer(x, st, segments=Segments(start, prefix))
        (y.square().sum() + sum(p.sum() for p in _flat(s))).backward()
        outs.append(
            (
                y.detach(),
                [p.detach() for p in _flat(s)],
                [t.grad.clone() for t in s0],
                {n: p.grad.clone() for n, p in layer.named_parameters()},
            )
        )
    (yr, sr, gr, pr), (yg, sg, gg, pg) = outs
    assert_close("y", yr, yg)
    for i, (a, b) in enumerate(zip(sr, sg, strict=True)):
        assert_close(f"state {i}", a, b)
    for i, (a, b) in enumerate(zip(gr, gg, strict=True)):
        assert_close(f"grad of initial state {i}", a, b, rtol=1e-4, atol=1e-5)
    for n in pr:
        assert_close(f"grad {n}", pr[n], pg[n], rtol=1e-4, atol=1e-5)


def check_prompt_then_decode(layer, P=9, T=16):
    """Bidirectional: parallel pass over prompt (prefix) + suffix == prompt pass, then suffix tokens one by one."""
    torch.manual_seed(0)
    x = torch.randn(1, T, layer.d_model)
    prefix = torch.zeros(1, T, dtype=torch.bool)
    prefix[:, :P] = True
    full, _ = layer(x, None, segments=Segments(None, prefix))
    a, s = layer(x[:, :P], None, segments=Segments(None, prefix[:, :P]))
    ys = [a]
    for t in range(P, T):
        y, s = layer(x[:, t : t + 1], s)
        ys.append(y)
    assert_close("prompt then decode", full, torch.cat(ys, 1))

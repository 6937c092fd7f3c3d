"""Causal depthwise conv1d: fast path == naive loop, continuation from a conv state, states at positions."""

import pytest
import torch

from statelab.ops.conv1d import causal_conv1d, causal_conv1d_naive, conv_states_at
from statelab.testing import assert_close


def _inputs(T, C=5, K=4, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, C, generator=g),
        torch.randn(C, K, generator=g),
        torch.randn(C, generator=g),
        torch.randn(B, C, K - 1, generator=g),
    )


@pytest.mark.parametrize("T", [1, 2, 3, 4, 17], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("act", [None, "silu"])
def test_fast_equals_naive(T, act):
    x, w, b, s0 = _inputs(T)
    for init in (None, s0):
        ry, rs = causal_conv1d_naive(x, w, b, init, act, True)
        gy, gs = causal_conv1d(x, w, b, init, act, True)
        assert_close("y", ry, gy)
        assert_close("state", rs, gs)


def test_matches_torch_conv1d_layer():
    x, w, b, _ = _inputs(11)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3)
    conv.weight.data.copy_(w[:, None, :])
    conv.bias.data.copy_(b)
    ref = conv(x.transpose(1, 2))[:, :, :11].transpose(1, 2)
    assert_close("y", ref, causal_conv1d(x, w, b)[0])


@pytest.mark.parametrize("t", [1, 2, 3, 6])
def test_continuation(t):
    x, w, b, s0 = _inputs(9)
    whole, ws = causal_conv1d(x, w, b, s0, "silu", True)
    y1, s1 = causal_conv1d(x[:, :t], w, b, s0, "silu", True)
    y2, s2 = causal_conv1d(x[:, t:], w, b, s1, "silu", True)
    assert_close("y", whole, torch.cat([y1, y2], 1))
    assert_close("state", ws, s2)
    at = conv_states_at(x, 4, [0, t, 9], s0)
    assert_close("at0", s0, at[:, 0])
    assert_close("at_t", s1, at[:, 1])
    assert_close("at_T", ws, at[:, 2])


def test_gradients_match_naive():
    x, w, b, s0 = (t.requires_grad_(True) for t in _inputs(7))
    gr = torch.autograd.grad(sum(o.sum() for o in causal_conv1d_naive(x, w, b, s0, "silu", True)), (x, w, b, s0))
    gg = torch.autograd.grad(sum(o.sum() for o in causal_conv1d(x, w, b, s0, "silu", True)), (x, w, b, s0))
    for name, a, c in zip(["dx", "dw", "db", "ds0"], gr, gg, strict=True):
        assert_close(name, a, c)


def test_state_is_new_memory_and_errors():
    x, w, b, s0 = _inputs(2)
    keep = s0.clone()
    _, s = causal_conv1d(x, w, b, s0, None, True)
    s.add_(1.0)
    assert torch.equal(s0, keep)
    with pytest.raises(ValueError, match="initial_state must be"):
        causal_conv1d(x, w, b, s0[:, :, :1])
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, activation="relu")

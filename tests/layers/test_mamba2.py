"""Mamba-2 mixer: continuation (full == prefix + suffix == token by token), backends agree, states at positions."""

import pytest
import torch

from statelab.layers.mamba2 import Mamba2LayerState, Mamba2Mixer
from statelab.testing import assert_close


def make_mixer(G=2, K=4, limit=(0.0, float("inf")), seed=0):
    torch.manual_seed(seed)
    m = Mamba2Mixer(d_model=12, d_inner=24, d_state=8, n_groups=G, head_dim=6, d_conv=K, time_step_limit=limit)
    with torch.no_grad():
        m.A_log.copy_(torch.randn(m.n_heads))  # spread the decays
        m.D.copy_(torch.randn(m.n_heads))
        m.norm.weight.copy_(1 + 0.1 * torch.randn(24))
    m.chunk_size = 8  # several chunks in short tests
    return m


def check_states(name, ref: Mamba2LayerState, got: Mamba2LayerState):
    assert_close(f"{name}.conv", ref.conv, got.conv)
    assert_close(f"{name}.ssm", ref.ssm, got.ssm)
    assert_close(f"{name}.sum_delta", ref.sum_delta, got.sum_delta)


@pytest.mark.parametrize("t", [1, 2, 3, 9, 20], ids=lambda t: f"t{t}")
def test_continuation(t):
    m = make_mixer()
    x = torch.randn(2, 21, 12)
    with torch.no_grad():
        y, s = m(x)
        y1, s1 = m(x[:, :t])
        y2, s2 = m(x[:, t:], s1)
        assert_close("prefix + suffix", y, torch.cat([y1, y2], 1))
        check_states("prefix + suffix", s, s2)
        st, ys = None, []
        for i in range(21):
            yi, st = m(x[:, i : i + 1], st)
            ys.append(yi)
    assert_close("token by token", y, torch.cat(ys, 1))
    check_states("token by token", s, st)


def test_time_step_limit_applies_on_every_path():
    m = make_mixer(limit=(0.05, 0.2))
    x = torch.randn(1, 10, 12)
    with torch.no_grad():
        y, s = m(x)
        st, ys = None, []
        for i in range(10):
            yi, st = m(x[:, i : i + 1], st)
            ys.append(yi)
    assert_close("y", y, torch.cat(ys, 1))
    # ΣΔ of 10 tokens clamped to [0.05, 0.2]
    assert bool((s.sum_delta >= 0.5 - 1e-5).all()) and bool((s.sum_delta <= 2.0 + 1e-5).all())


def test_naive_backend_equals_chunk_backend_with_gradients():
    m = make_mixer(G=1)
    x = torch.randn(2, 19, 12, requires_grad=True)
    s0 = Mamba2LayerState(
        torch.randn(2, m.conv_dim, 3), torch.randn(2, m.n_heads, 6, 8, requires_grad=True), torch.zeros(2, 4)
    )
    out = {}
    for backend in ("naive", "chunk"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        s0.ssm.grad = None
        y, s = m(x, s0)
        (y.square().sum() + s.ssm.square().sum()).backward()
        out[backend] = (y.detach(), s.ssm.detach(), x.grad.clone(), s0.ssm.grad.clone(), m.A_log.grad.clone())
    for name, r, g in zip(["y", "ssm", "dx", "dssm0", "dA_log"], out["naive"], out["chunk"], strict=True):
        assert_close(name, r, g, rtol=1e-4, atol=1e-5 * max(1.0, float(r.abs().max())))


def test_states_at_positions_equal_prefix_states():
    m = make_mixer()
    x = torch.randn(2, 17, 12)
    _, s0 = m(torch.randn(2, 5, 12))
    with torch.no_grad():
        _, st = m(x, s0, positions=[1, 2, 8, 17])
        at = [Mamba2LayerState(st.at.conv[:, k], st.at.ssm[:, k], st.at.sum_delta[:, k]) for k in range(4)]
        for p, got in zip([1, 2, 8, 17], at, strict=True):
            _, ref = m(x[:, :p], s0)
            check_states(f"after {p}", ref, got)


def test_given_state_is_not_modified_and_bad_input_is_refused():
    m = make_mixer()
    _, s = m(torch.randn(1, 6, 12))
    copy = Mamba2LayerState(*(t.clone() for t in (s.conv, s.ssm, s.sum_delta)))
    with torch.no_grad():
        m(torch.randn(1, 4, 12), s)
        m(torch.randn(1, 1, 12), s)
    check_states("unchanged", copy, s)
    with pytest.raises(ValueError, match=r"expects x \[B, T, 12\]"):
        m(torch.randn(1, 4, 13))


def test_protocol_keywords_and_backend_are_validated():
    from statelab.layers.protocol import Segments

    m = make_mixer()
    x = torch.randn(1, 4, 12)
    with pytest.raises(ValueError, match="does not support segments="):
        m(x, segments=Segments(torch.zeros(1, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        m.backend = "fast"
    assert m.backend == "chunk"
    with pytest.raises(ValueError, match="unknown backend"):
        Mamba2Mixer(12, 24, 8, 1, 6, backend="parallel")

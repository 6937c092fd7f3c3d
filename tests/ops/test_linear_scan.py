"""Gated linear scan (gated SSM, Hawk, the Birdie reward model): the log-depth path equals the fp32 loop on
outputs, final state, states at positions and gradients (initial state included), with exact resets."""

import pytest
import torch

from statelab.ops.linear_scan import linear_scan, linear_scan_naive, linear_scan_parallel
from statelab.testing import assert_close


def rand_scan(B, T, D, seed=0, resets=True):
    g = torch.Generator().manual_seed(seed)
    log_a = -torch.rand(B, T, D, generator=g) * 2
    if resets:
        log_a[:, T // 3] = float("-inf")
    u = torch.randn(B, T, D, generator=g)
    h0 = torch.randn(B, D, generator=g)
    return log_a, u, h0


@pytest.mark.parametrize("T", [1, 7, 63, 64, 100])
def test_log_depth_scan_matches_naive_with_gradients(T):
    log_a, u, h0 = rand_scan(2, T, 5, seed=T)
    ref_in = [t.clone().requires_grad_() for t in (log_a, u, h0)]
    got_in = [t.clone().requires_grad_() for t in (log_a, u, h0)]
    pos = sorted({0, 1, T // 2, T})
    ref = linear_scan_naive(*ref_in, output_final_state=True, return_states_at=pos)
    got = linear_scan_parallel(*got_in, output_final_state=True, return_states_at=pos)
    hr, sr, hg, sg = ref.y, ref.final_state, got.y, got.final_state
    assert_close("h", hr, hg)
    assert_close("final state", sr, sg)
    assert_close("states at positions", ref.states_at, got.states_at)
    assert got.states_at.shape == (2, len(pos), 5) and got.sum_delta is None
    w = torch.randn_like(hr)
    wa = torch.randn_like(ref.states_at)
    ((hr * w).sum() + sr.sum() + (ref.states_at * wa).sum()).backward()
    ((hg * w).sum() + sg.sum() + (got.states_at * wa).sum()).backward()
    for name, a, b in zip(("log_a", "u", "h0"), ref_in, got_in, strict=True):
        assert torch.isfinite(b.grad).all()
        assert_close(f"grad {name}", a.grad, b.grad)


def test_states_at_are_the_states_after_p_tokens():
    log_a, u, h0 = rand_scan(2, 20, 3, seed=3)
    out = linear_scan(log_a, u, h0, return_states_at=[0, 5, 20])
    assert torch.equal(out.states_at[:, 0], h0) and out.final_state is None
    for k, p in enumerate([5, 20]):
        ref = linear_scan_naive(log_a[:, :p], u[:, :p], h0, output_final_state=True).final_state
        assert_close(f"state after {p}", ref, out.states_at[:, k + 1])


def test_empty_call_keeps_the_state_and_errors_are_clear():
    log_a, u, h0 = rand_scan(2, 4, 3)
    out = linear_scan(log_a[:, :0], u[:, :0], h0, output_final_state=True)
    assert out.y.shape == (2, 0, 3) and torch.equal(out.final_state, h0)
    assert out.final_state.data_ptr() != h0.data_ptr()
    with pytest.raises(ValueError, match="unknown backend"):
        linear_scan(log_a, u, backend="chunk")
    with pytest.raises(ValueError, match=r"initial_state must be \[B, D\]"):
        linear_scan(log_a, u, h0[:, :2])
    with pytest.raises(ValueError, match="return_states_at must lie in"):
        linear_scan(log_a, u, return_states_at=[5])

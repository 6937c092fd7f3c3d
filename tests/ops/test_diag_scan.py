"""Diagonal scan (S5, GD-SSM): the chunked path equals the naive loop on outputs, final state, states at positions
and gradients (initial state included), for a real [P, d] accumulator with a readout and a complex [P] state."""

import math

import pytest
import torch

from statelab.ops.diag_scan import diag_scan, diag_scan_chunk, diag_scan_naive
from statelab.testing import assert_close


def _random_scan_inputs(B=3, W=11, P=4, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, W, P, d, generator=gen, dtype=torch.float64)
    g = torch.randn(B, W, d, generator=gen, dtype=torch.float64)
    # decays in (0.5, 1.1]: both forgetting and slightly growing entries, as GD-SSM's "real" parametrisation allows
    log_decay = torch.empty(P, d, dtype=torch.float64).uniform_(math.log(0.5), math.log(1.1), generator=gen)
    s0 = torch.randn(B, P, d, generator=gen, dtype=torch.float64)
    return a, g, log_decay, s0


@pytest.mark.parametrize("W,chunk", [(1, 4), (11, 4), (12, 4), (11, 16), (7, 1)], ids=lambda v: str(v))
def test_scan_chunked_equals_naive_outputs_state_and_gradients(W, chunk):
    a, g, log_decay, s0 = _random_scan_inputs(W=W)
    leaves = [t.clone().requires_grad_(True) for t in (a, log_decay, g, s0)]
    leaves2 = [t.clone().requires_grad_(True) for t in (a, log_decay, g, s0)]
    pos = sorted({0, 1, W // 2, W})
    r1 = diag_scan_naive(*leaves, output_final_state=True, return_states_at=pos)
    r2 = diag_scan_chunk(*leaves2, output_final_state=True, return_states_at=pos, chunk_size=chunk)
    h1, f1, h2, f2 = r1.y, r1.final_state, r2.y, r2.final_state
    assert_close("h", h1, h2)
    assert_close("final state", f1, f2)
    assert_close("states at positions", r1.states_at, r2.states_at)
    assert r1.states_at.shape == (3, len(pos), 4, 5) and r1.sum_delta is None
    w_h = torch.randn_like(h1)
    w_s = torch.randn_like(f1)
    w_a = torch.randn_like(r1.states_at)
    ((h1 * w_h).sum() + (f1 * w_s).sum() + (r1.states_at * w_a).sum()).backward()
    ((h2 * w_h).sum() + (f2 * w_s).sum() + (r2.states_at * w_a).sum()).backward()
    for name, l1, l2 in zip(["a", "log_decay", "g", "initial_state"], leaves, leaves2, strict=True):
        assert_close(f"grad {name}", l1.grad, l2.grad)


def test_states_at_positions_equal_prefix_runs():
    a, g, log_decay, s0 = _random_scan_inputs(W=11)
    out = diag_scan(a, g=g, log_decay=log_decay, initial_state=s0, return_states_at=[0, 3, 11, 3], chunk_size=4)
    assert torch.equal(out.states_at[:, 0], s0)
    for k, p in enumerate([0, 3, 11, 3]):
        ref = diag_scan_naive(a[:, :p], log_decay, g[:, :p], s0, output_final_state=True).final_state
        assert_close(f"state after {p}", ref, out.states_at[:, k])


def test_scan_leaves_the_initial_state_untouched():
    a, g, log_decay, s0 = _random_scan_inputs()
    keep = s0.clone()
    diag_scan_chunk(a, log_decay, g, s0, chunk_size=3)
    diag_scan_naive(a, log_decay, g, s0)
    assert torch.equal(s0, keep)


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 8), (13, 32)], ids=str)
def test_complex_state_without_readout_chunk_equals_naive_with_gradients(T, chunk):
    gen = torch.Generator().manual_seed(T)
    b = torch.randn(2, T, 3, generator=gen, dtype=torch.complex128).requires_grad_(True)
    log_decay = torch.complex(
        -torch.rand(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    ).requires_grad_(True)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.complex128).requires_grad_(True)
    outs = []
    for backend in ("naive", "chunk"):
        for t in (b, log_decay, h0):
            t.grad = None
        out = diag_scan(b, log_decay, None, h0, True, backend=backend, chunk_size=chunk)
        h = out.y
        (h.abs().pow(2).sum() + out.final_state.abs().sum()).backward()
        outs.append((h.detach(), out.final_state.detach(), b.grad.clone(), log_decay.grad.clone(), h0.grad.clone()))
    for name, x, y in zip(["h", "final state", "grad b", "grad decay", "grad h0"], *outs, strict=True):
        assert torch.allclose(x, y, atol=1e-10), name
    assert torch.equal(outs[0][1], outs[0][0][:, -1])


def test_bad_inputs_raise_clear_errors():
    a, g, log_decay, s0 = _random_scan_inputs(W=5)
    with pytest.raises(ValueError, match="unknown backend"):
        diag_scan(a, log_decay, g, backend="fast")
    with pytest.raises(ValueError, match=r"log_decay must be \[\*S\]"):
        diag_scan(a, log_decay[:2], g)
    with pytest.raises(ValueError, match=r"g must be \[B, T, S\[-1\]\]"):
        diag_scan(a, log_decay, g[:, :, :2])
    with pytest.raises(ValueError, match=r"initial_state must be \[B, \*S\]"):
        diag_scan_naive(a, log_decay, g, s0[:1])
    with pytest.raises(ValueError, match="return_states_at must lie in"):
        diag_scan_chunk(a, log_decay, g, return_states_at=[6])
    with pytest.raises(ValueError, match="chunk_size"):
        diag_scan_chunk(a, log_decay, g, chunk_size=0)

"""Selective scan: the chunked fast path equals the naive loop (outputs, states, ΣΔ, gradients)."""

import pytest
import torch

from statelab.ops.selective_scan import selective_scan, selective_scan_chunk, selective_scan_naive
from statelab.testing import assert_close

D, N = 6, 5


def _inputs(T, B=2, dtype=torch.float32, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, D, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(B, T, D, generator=g) - 1.0)
    A = -torch.exp(torch.randn(D, N, generator=g))
    Bm = torch.randn(B, T, N, generator=g)
    Cm = torch.randn(B, T, N, generator=g)
    Dsk = torch.randn(D, generator=g)
    h0 = torch.randn(B, D, N, generator=g) if with_state else None
    ts = [u, delta, A, Bm, Cm, Dsk] + ([h0] if with_state else [])
    ts = [t.to(dtype).requires_grad_(True) for t in ts]
    return ts if with_state else [*ts, None]


@pytest.mark.parametrize("T", [1, 63, 64, 65, 500], ids=lambda t: f"T{t}")
def test_chunk_equals_naive_fp32(T):
    args = _inputs(T)
    pos = sorted({0, 1, T // 2, T})
    ref = selective_scan_naive(*args, output_final_state=True, return_states_at=pos)
    got = selective_scan_chunk(*args, output_final_state=True, return_states_at=pos)
    assert_close("y", ref.y, got.y, rtol=1e-4, atol=1e-5)
    assert_close("final", ref.final_state, got.final_state, rtol=1e-4, atol=1e-5)
    assert_close("sum_delta", ref.sum_delta, got.sum_delta, rtol=1e-5, atol=1e-4)
    assert_close("states_at", ref.states_at, got.states_at, rtol=1e-4, atol=1e-5)
    assert_close("sum_delta_at", ref.sum_delta_at, got.sum_delta_at, rtol=1e-5, atol=1e-4)
    # gradients through every output, including the returned states and ΣΔ
    g = torch.Generator().manual_seed(1)
    wy, wh, wa = (torch.randn(x.shape, generator=g) for x in (ref.y, ref.final_state, ref.states_at))
    ws = torch.randn(ref.sum_delta.shape, generator=g)

    def loss(o):
        return (o.y * wy).sum() + (o.final_state * wh).sum() + (o.states_at * wa).sum() + (o.sum_delta * ws).sum()

    gr = torch.autograd.grad(loss(ref), args)
    gg = torch.autograd.grad(loss(got), args)
    for name, a, b in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dh0"], gr, gg, strict=True):
        assert_close(name, a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(a.detach().abs().max())))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 500], ids=lambda t: f"T{t}")
def test_chunk_equals_naive_bf16(T):
    args = _inputs(T, dtype=torch.bfloat16, seed=2)
    ref = selective_scan_naive(*args, output_final_state=True)
    got = selective_scan_chunk(*args, output_final_state=True)
    assert got.y.dtype == torch.bfloat16
    scale = float(ref.y.detach().float().abs().max())
    assert_close("y", ref.y.float(), got.y.float(), rtol=5e-2, atol=2e-2 * scale)
    assert_close("final", ref.final_state, got.final_state, rtol=1e-3, atol=1e-3)
    gr = torch.autograd.grad(ref.y.float().sum() + ref.final_state.sum(), args)
    gg = torch.autograd.grad(got.y.float().sum() + got.final_state.sum(), args)
    for name, a, b in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dh0"], gr, gg, strict=True):
        assert_close(name, a.float(), b.float(), rtol=5e-2, atol=5e-2 * max(1.0, float(a.float().abs().max())))


def test_no_initial_state_and_no_grad_path():
    u, delta, A, Bm, Cm, Dsk, _ = _inputs(70, with_state=False)
    with torch.no_grad():
        ref = selective_scan_naive(u, delta, A, Bm, Cm, Dsk, None, True, [3, 70])
        got = selective_scan(u, delta, A, Bm, Cm, Dsk, None, True, [3, 70])
    assert_close("y", ref.y, got.y, rtol=1e-4, atol=1e-5)
    assert_close("states_at", ref.states_at, got.states_at, rtol=1e-4, atol=1e-5)
    assert got.final_state is not None and got.states_at.shape == (2, 2, D, N)


def test_continuation_split_equals_whole():
    u, delta, A, Bm, Cm, Dsk, h0 = (t.detach() for t in _inputs(90, seed=3))
    whole = selective_scan_chunk(u, delta, A, Bm, Cm, Dsk, h0, True)
    first = selective_scan_chunk(u[:, :37], delta[:, :37], A, Bm[:, :37], Cm[:, :37], Dsk, h0, True)
    second = selective_scan_chunk(u[:, 37:], delta[:, 37:], A, Bm[:, 37:], Cm[:, 37:], Dsk, first.final_state, True)
    assert_close("y", whole.y, torch.cat([first.y, second.y], 1))
    assert_close("final", whole.final_state, second.final_state)
    assert_close("sum_delta", whole.sum_delta, first.sum_delta + second.sum_delta)


def test_inputs_not_mutated_and_errors():
    u, delta, A, Bm, Cm, Dsk, h0 = (t.detach() for t in _inputs(40, seed=4))
    keep = h0.clone()
    out = selective_scan(u, delta, A, Bm, Cm, Dsk, h0, True)
    assert torch.equal(h0, keep) and out.final_state.data_ptr() != h0.data_ptr()
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(u, delta, A, Bm, Cm, Dsk, h0[:, :, :2], True)
    with pytest.raises(ValueError, match="return_states_at must lie"):
        selective_scan(u, delta, A, Bm, Cm, Dsk, h0, True, [41])
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan(u, delta, A, Bm, Cm, backend="cuda-ish")


def test_intra_op_threads_restored():
    before = torch.get_num_threads()
    u, delta, A, Bm, Cm, Dsk, h0 = (t.detach() for t in _inputs(40, seed=5))
    selective_scan_chunk(u, delta, A, Bm, Cm, Dsk, h0, True)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("block_rows", [1, 2, 3])
def test_row_blocked_forward_equals_one_block(monkeypatch, block_rows):
    """Without autograd a batch is scanned in blocks of rows (cache-sized); the result equals one block and the
    naive loop, with states at positions too."""
    from statelab.ops.selective_scan import chunk

    args = [t.detach() for t in _inputs(70, B=5, seed=3)]
    pos = [0, 1, 33, 70]
    with torch.no_grad():
        whole = selective_scan_chunk(*args, output_final_state=True, return_states_at=pos)
        monkeypatch.setattr(chunk, "ROW_BLOCK_BYTES", block_rows * chunk.CHUNK * D * N * 4)
        blocked = selective_scan_chunk(*args, output_final_state=True, return_states_at=pos)
        ref = selective_scan_naive(*args, output_final_state=True, return_states_at=pos)
    for name in ("y", "final_state", "states_at", "sum_delta"):
        assert torch.equal(getattr(whole, name), getattr(blocked, name)), name
        assert_close(name, getattr(ref, name), getattr(blocked, name), rtol=1e-4, atol=1e-5)

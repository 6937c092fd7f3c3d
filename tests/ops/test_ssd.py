"""SSD scan: chunked == naive (outputs, final state, ΣΔ, states at positions, gradients), stages, decode step."""

import pytest
import torch
import torch.nn.functional as F

from statelab.ops.ssd import ssd_scan, ssd_scan_chunk, ssd_scan_naive, ssd_step
from statelab.ops.ssd.chunk import chunk_cumsum, chunk_states, intra_chunk_output, pass_states, state_output
from statelab.testing import assert_close


def make_inputs(B=2, T=65, H=4, P=8, G=2, N=16, dtype=torch.float32, seed=0, decay_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g)
    dt = F.softplus(torch.randn(B, T, H, generator=g) - 1.0) * decay_scale
    A = -torch.exp(torch.randn(H, generator=g))
    Bm = torch.randn(B, T, G, N, generator=g) / N**0.5
    Cm = torch.randn(B, T, G, N, generator=g) / N**0.5
    D = torch.randn(H, generator=g)
    h0 = torch.randn(B, H, P, N, generator=g) * 0.5
    return [t.to(dtype) for t in (x, dt, A, Bm, Cm, D, h0)]


def run_with_grads(fn, inputs, positions, device="cpu"):
    """Run ``fn`` on ``device`` with a fixed random loss over y and the final state; results back on the CPU."""
    leaves = [t.detach().clone().to(device).requires_grad_(True) for t in inputs]
    out = fn(*leaves, output_final_state=True, return_states_at=positions)
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(out.y.shape, generator=g).to(device)
    ws = torch.randn(out.final_state.shape, generator=g).to(device)
    loss = (out.y.float() * wy).sum() + (out.final_state * ws).sum()
    loss.backward()
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    out = type(out)(*(cpu(t) for t in out))
    return out, [cpu(t.grad) for t in leaves]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


NAMES = ["x", "dt", "A", "Bm", "Cm", "D", "initial_state"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 500], ids=lambda t: f"T{t}")
def test_chunk_equals_naive(T, dtype, device):
    inputs = make_inputs(T=T, dtype=dtype)
    positions = sorted({1, (T + 1) // 2, T})
    ref, ref_grads = run_with_grads(ssd_scan_naive, inputs, positions)
    chunked = lambda *a, **k: ssd_scan_chunk(*a, **k, chunk_size=64)  # noqa: E731
    got, got_grads = run_with_grads(chunked, inputs, positions, device)
    tol = {} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    assert got.y.dtype == dtype
    assert_close("y", ref.y, got.y, **tol)
    assert_close("final_state", ref.final_state, got.final_state, **tol)
    assert got.sum_delta.dtype == torch.float32
    assert_close("sum_delta", ref.sum_delta, got.sum_delta)
    for p, r, c in zip(positions, ref.states_at.unbind(1), got.states_at.unbind(1), strict=True):
        assert_close(f"state after {p}", r, c, **tol)
    for p, r, c in zip(positions, ref.sum_delta_at.unbind(1), got.sum_delta_at.unbind(1), strict=True):
        assert_close(f"sum_delta after {p}", r, c)
    for name, r, c in zip(NAMES, ref_grads, got_grads, strict=True):
        scale = max(1.0, float(r.abs().max()))
        if dtype == torch.float32:
            assert_close(f"d{name}", r, c, rtol=1e-4, atol=1e-5 * scale)
        else:
            assert_close(f"d{name}", r, c, rtol=5e-2, atol=5e-2 * scale)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 256], ids=lambda q: f"Q{q}")
def test_chunk_size_does_not_change_the_result(chunk_size):
    inputs = make_inputs(T=65, G=1)
    ref = ssd_scan_naive(*inputs, output_final_state=True)
    got = ssd_scan_chunk(*inputs, output_final_state=True, chunk_size=chunk_size)
    assert_close("y", ref.y, got.y)
    assert_close("final_state", ref.final_state, got.final_state)


def test_strong_decay_stays_finite_and_exact():
    # Δ·A of order -50 per token: whole-chunk sums reach -3000, far beyond exp's fp32 range
    inputs = make_inputs(T=130, decay_scale=40.0)
    ref = ssd_scan_naive(*inputs, output_final_state=True)
    got = ssd_scan_chunk(*inputs, output_final_state=True)
    assert torch.isfinite(got.y).all() and torch.isfinite(got.final_state).all()
    assert_close("y", ref.y, got.y)
    assert_close("final_state", ref.final_state, got.final_state)


def test_continuation_from_state():
    x, dt, A, Bm, Cm, D, h0 = make_inputs(T=100)
    full = ssd_scan_chunk(x, dt, A, Bm, Cm, D, h0, output_final_state=True)
    a = ssd_scan_chunk(x[:, :37], dt[:, :37], A, Bm[:, :37], Cm[:, :37], D, h0, output_final_state=True)
    b = ssd_scan_chunk(x[:, 37:], dt[:, 37:], A, Bm[:, 37:], Cm[:, 37:], D, a.final_state, output_final_state=True)
    assert_close("y", full.y, torch.cat([a.y, b.y], 1))
    assert_close("final_state", full.final_state, b.final_state)
    assert_close("sum_delta", full.sum_delta, a.sum_delta + b.sum_delta)


def test_step_equals_naive_token_by_token():
    x, dt, A, Bm, Cm, D, h0 = make_inputs(T=9)
    ref = ssd_scan_naive(x, dt, A, Bm, Cm, D, h0, output_final_state=True)
    h, ys = h0, []
    for t in range(9):
        y, h = ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D, h)
        ys.append(y)
    assert_close("y", ref.y, torch.stack(ys, 1))
    assert_close("state", ref.final_state, h)


def test_inputs_are_not_modified():
    inputs = make_inputs(T=70)
    copies = [t.clone() for t in inputs]
    for backend in ("naive", "chunk"):
        out = ssd_scan(*inputs, output_final_state=True, backend=backend)
        out.final_state.add_(1.0)
    for name, a, b in zip(NAMES, copies, inputs, strict=True):
        assert torch.equal(a, b), name


# ---- the four stages, each against the naive loop ---------------------------------------------------------
def _chunked(T=96, Q=32, G=2):
    x, dt, A, Bm, Cm, D, h0 = make_inputs(T=T, G=G)
    Bsz, _, H, P = x.shape
    N = Bm.shape[-1]
    Nc = T // Q
    u = (x * dt[..., None]).view(Bsz, Nc, Q, H, P)
    Bc = Bm.view(Bsz, Nc, Q, G, N).transpose(2, 3)
    Cc = Cm.view(Bsz, Nc, Q, G, N).transpose(2, 3)
    acs = chunk_cumsum(dt * A, Q)
    return (x, dt, A, Bm, Cm, D, h0), (u, Bc, Cc, acs), Q


def test_stage_intra_chunk_and_chunk_states_equal_a_scan_from_zero():
    (x, dt, A, Bm, Cm, _, _), (u, Bc, Cc, acs), Q = _chunked()
    y = intra_chunk_output(u, acs, Bc, Cc)
    s = chunk_states(u, acs, Bc)
    for c in range(u.shape[1]):
        sl = slice(c * Q, (c + 1) * Q)
        ref = ssd_scan_naive(x[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], None, None, output_final_state=True)
        assert_close(f"intra chunk {c}", ref.y, y[:, c])
        assert_close(f"chunk state {c}", ref.final_state, s[:, c])


def test_stage_pass_states_is_the_sequential_fold():
    (x, dt, A, Bm, Cm, D, h0), (u, Bc, Cc, acs), Q = _chunked()
    entering, final = pass_states(chunk_states(u, acs, Bc), torch.exp(acs[..., -1]).float(), h0)
    for c in range(u.shape[1]):
        ref = ssd_scan_naive(x[:, : c * Q], dt[:, : c * Q], A, Bm[:, : c * Q], Cm[:, : c * Q], D, h0, True)
        assert_close(f"state entering chunk {c}", ref.final_state, entering[:, c])
    assert_close("final", ssd_scan_naive(x, dt, A, Bm, Cm, D, h0, True).final_state, final)


def test_stage_state_output_is_the_response_to_the_entering_state():
    (x, dt, A, Bm, Cm, _, h0), (u, Bc, Cc, acs), Q = _chunked()
    entering = h0[:, None].expand(-1, u.shape[1], -1, -1, -1)
    y = state_output(Cc, entering, acs)
    for c in range(u.shape[1]):
        sl = slice(c * Q, (c + 1) * Q)
        # zero inputs: the output is the entering state decayed and read out by C
        ref = ssd_scan_naive(torch.zeros_like(x[:, sl]), dt[:, sl], A, Bm[:, sl], Cm[:, sl], None, h0)
        assert_close(f"state output chunk {c}", ref.y, y[:, c])


# ---- errors -----------------------------------------------------------------------------------------------
def test_bad_shapes_and_backend_raise_clear_errors():
    x, dt, A, Bm, Cm, D, h0 = make_inputs(T=5)
    with pytest.raises(ValueError, match=r"dt must be \[B, T, H\]"):
        ssd_scan_chunk(x, dt[:, :4], A, Bm, Cm)
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd_scan_chunk(x, dt, A, Bm.repeat(1, 1, 3, 1)[:, :, :3], Cm.repeat(1, 1, 3, 1)[:, :, :3])
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, P, N\]"):
        ssd_scan_naive(x, dt, A, Bm, Cm, D, h0[:, :, :3])
    with pytest.raises(ValueError, match="positions must lie in"):
        ssd_scan_chunk(x, dt, A, Bm, Cm, return_states_at=[6])
    with pytest.raises(ValueError, match="unknown SSD backend"):
        ssd_scan(x, dt, A, Bm, Cm, backend="fast")


def test_step_into_a_buffer_equals_the_plain_step():
    x, dt, A, Bm, Cm, D, h0 = make_inputs(T=1)
    y, h = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, h0)
    buf = torch.full_like(h0, float("nan"))
    y2, h2 = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, h0, out=buf)
    assert h2.data_ptr() == buf.data_ptr()
    assert torch.equal(y, y2) and torch.equal(h, h2)
    with pytest.raises(ValueError, match="separate fp32 buffer"):
        ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, h0, out=h0)


@pytest.mark.parametrize("T", [63, 64, 200], ids=lambda t: f"T{t}")
def test_blocked_inference_equals_one_pass_and_naive(monkeypatch, T):
    """Without autograd a long call runs in blocks of whole chunks (cache-sized temporaries); blocks of 1 and 2
    chunks give what one pass and the naive loop give, states at positions included (0, block edges, inside blocks,
    the end, a repeat)."""
    from statelab.ops.ssd import chunk

    x, dt, A, Bm, Cm, D, h0 = make_inputs(B=2, T=T, decay_scale=0.5)
    positions = sorted({0, 1, 15, 16, 17, T // 2, T - 1, T}) + [16]
    with torch.no_grad():
        ref = ssd_scan_naive(x, dt, A, Bm, Cm, D, h0, True, positions)
        monkeypatch.setattr(chunk, "BLOCK_BYTES", 1 << 40)
        one = ssd_scan_chunk(x, dt, A, Bm, Cm, D, h0, True, positions, chunk_size=16)
        for chunks in (1, 2):
            per_chunk = 2 * 4 * 16 * 16 * 8  # B x H x Q x Q fp64
            monkeypatch.setattr(chunk, "BLOCK_BYTES", chunks * per_chunk)
            assert chunk.block_tokens(2, 4, 16) == 16 * chunks
            got = ssd_scan_chunk(x, dt, A, Bm, Cm, D, h0, True, positions, chunk_size=16)
            for name, a, b in (("one pass", one, got), ("naive", ref, got)):
                assert_close(f"y vs {name}", a.y, b.y)
                assert_close(f"final_state vs {name}", a.final_state, b.final_state)
                assert_close(f"sum_delta vs {name}", a.sum_delta, b.sum_delta)
                assert_close(f"states_at vs {name}", a.states_at, b.states_at)
                assert_close(f"sum_delta_at vs {name}", a.sum_delta_at, b.sum_delta_at)

import pytest
import torch

from statelab.layers.bidirectional import (
    reverse_reset,
    segment_causal_conv,
    split_scan,
    split_scan_naive,
)
from statelab.layers.gated_ssm import GatedSSMLayer
from statelab.layers.hawk import HawkLayer
from statelab.layers.protocol import Segments
from statelab.testing import assert_close


def rand_scan(B, T, D, seed=0, resets=True):
    g = torch.Generator().manual_seed(seed)
    log_a = -torch.rand(B, T, D, generator=g) * 2
    if resets:
        log_a[:, T // 3] = float("-inf")
    u = torch.randn(B, T, D, generator=g)
    h0 = torch.randn(B, D, generator=g)
    return log_a, u, h0


def masks(B=2, T=40, seed=0):
    """Random packed rows: samples of random lengths, each with a random prefix part, padding at the end."""
    g = torch.Generator().manual_seed(seed)
    seq_start = torch.zeros(B, T, dtype=torch.bool)
    is_prefix = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        t = 0
        while t < T - 6:
            n = int(torch.randint(3, 14, (1,), generator=g))
            n = min(n, T - 4 - t)
            p = int(torch.randint(0, n, (1,), generator=g))
            seq_start[b, t] = True
            is_prefix[b, t : t + p] = True
            t += n
    return seq_start, is_prefix


@pytest.mark.parametrize("bidirectional", [False, True])
def test_split_scan_matches_its_reference(bidirectional):
    log_a, u, _ = rand_scan(2, 40, 6, resets=False)
    seq_start, is_prefix = masks()
    h0 = torch.randn(2, 3 if bidirectional else 6)
    hr, sr = split_scan_naive(log_a, u, h0, seq_start, is_prefix, bidirectional)
    hg, sg = split_scan(log_a, u, h0, seq_start, is_prefix, bidirectional)
    assert_close("h", hr, hg)
    assert_close("state", sr, sg)


def test_reverse_reset_rules():
    seq_start = torch.tensor([[1, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    is_prefix = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    # position t reads t+1 only inside one sample's prefix
    assert reverse_reset(seq_start, is_prefix)[0].tolist() == [False, True, True, True, False, False, True, True]


def test_conv_window_stops_at_sample_starts_and_continues_from_state():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 3)
    w, b = torch.randn(3, 4), torch.randn(3)
    start = torch.zeros(1, 12, dtype=torch.bool)
    start[0, 5] = True
    y, _ = segment_causal_conv(x, w, b, None, start)
    y2, _ = segment_causal_conv(x[:, 5:], w, b, None, None)
    assert_close("second sample alone", y2, y[:, 5:])
    full, st = segment_causal_conv(x, w, b, None, None)
    a, s1 = segment_causal_conv(x[:, :7], w, b, None, None)
    c, s2 = segment_causal_conv(x[:, 7:], w, b, s1, None)
    assert_close("continued", full, torch.cat([a, c], 1))
    assert_close("conv state", st, s2)


def make_layer(kind, bidirectional=True):
    torch.manual_seed(1)
    if kind == "gated_ssm":
        return GatedSSMLayer(8, 6, bidirectional=bidirectional)
    return HawkLayer(8, 6, bidirectional=bidirectional)


@pytest.mark.parametrize("kind", ["gated_ssm", "hawk"])
def test_no_suffix_position_sees_a_later_token(kind):
    layer = make_layer(kind)
    T = 20
    x = torch.randn(1, T, 8)
    seq_start = torch.zeros(1, T, dtype=torch.bool)
    seq_start[0, 0] = True
    is_prefix = torch.zeros(1, T, dtype=torch.bool)
    is_prefix[0, :8] = True
    y, _ = layer(x, None, segments=Segments(seq_start, is_prefix))
    for t in range(8, T - 1):  # perturb suffix token t+1: outputs <= t unchanged
        x2 = x.clone()
        x2[0, t + 1] += 3.0
        y2, _ = layer(x2, None, segments=Segments(seq_start, is_prefix))
        assert torch.equal(y2[:, : t + 1], y[:, : t + 1]), f"suffix position <= {t} saw token {t + 1}"
        assert not torch.equal(y2[:, t + 1], y[:, t + 1])
    # a prefix token does change earlier prefix outputs (the reverse half reads it)
    x3 = x.clone()
    x3[0, 6] += 3.0
    y3, _ = layer(x3, None, segments=Segments(seq_start, is_prefix))
    assert not torch.allclose(y3[:, :6], y[:, :6])


@pytest.mark.parametrize("kind", ["gated_ssm", "hawk"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_row_equals_samples_one_by_one(kind, bidirectional):
    layer = make_layer(kind, bidirectional)
    seq_start, is_prefix = masks(B=1, T=48, seed=3)
    x = torch.randn(1, 48, 8)
    y, _ = layer(x, None, segments=Segments(seq_start, is_prefix))
    starts = seq_start[0].nonzero().flatten().tolist() + [48]
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        ys, _ = layer(x[:, s:e], None, segments=Segments(seq_start[:, s:e], is_prefix[:, s:e]))
        assert_close(f"sample at {s}", ys, y[:, s:e])
    # changing sample k+1 leaves sample k unchanged
    x2 = x.clone()
    x2[:, starts[1] :] += 1.0
    y2, _ = layer(x2, None, segments=Segments(seq_start, is_prefix))
    assert torch.equal(y2[:, : starts[1]], y[:, : starts[1]])


def mamba2(bidirectional):
    from statelab.layers.bidirectional import BidirectionalMamba2Mixer

    torch.manual_seed(2)
    return BidirectionalMamba2Mixer(16, 32, 4, 1, 8, bidirectional=bidirectional)


def test_split_mamba2_in_causal_mode_equals_the_mamba2_mixer():
    from statelab.layers.mamba2 import Mamba2Mixer

    m = mamba2(False)
    ref = Mamba2Mixer(16, 32, 4, 1, 8)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 21, 16)
    y_ref, st_ref = ref(x)
    y, (ssm, conv) = m(x)
    assert_close("y", y_ref, y, rtol=1e-4, atol=1e-5)
    assert_close("ssm state", st_ref.ssm, ssm, rtol=1e-4, atol=1e-5)
    assert_close("conv state", st_ref.conv, conv)
    m.backend = "naive"
    y2, _ = m(x, None)
    assert_close("naive scan", y, y2, rtol=1e-4, atol=1e-5)


def test_split_mamba2_bidirectional_prefix_is_leak_free_and_packs():
    m = mamba2(True)
    T = 18
    x = torch.randn(1, T, 16)
    start = torch.zeros(1, T, dtype=torch.bool)
    start[0, [0, 10]] = True
    prefix = torch.zeros(1, T, dtype=torch.bool)
    prefix[0, 0:5] = prefix[0, 10:14] = True
    y, _ = m(x, None, segments=Segments(start, prefix))
    for t in range(5, 9):
        x2 = x.clone()
        x2[0, t + 1] += 2.0
        y2, _ = m(x2, None, segments=Segments(start, prefix))
        assert_close(f"outputs <= {t}", y[:, : t + 1], y2[:, : t + 1], rtol=0, atol=1e-6)
    x3 = x.clone()
    x3[0, 3] += 2.0
    assert not torch.allclose(m(x3, None, segments=Segments(start, prefix))[0][:, :3], y[:, :3])
    for s, e in ((0, 10), (10, T)):
        one, _ = m(x[:, s:e], None, segments=Segments(start[:, s:e], prefix[:, s:e]))
        assert_close(f"sample {s}:{e}", y[:, s:e], one, rtol=1e-4, atol=1e-5)
    # prompt in parallel, then decode from the forward half of the state
    a, st = m(x[:, :6], None, segments=Segments(None, prefix[:, :6] | True))
    full, _ = m(x[:, :9], None, segments=Segments(None, torch.arange(9)[None] < 6))
    b, st = m(x[:, 6:7], st)
    c, _ = m(x[:, 7:9], st)
    assert_close("prompt then decode", full, torch.cat([a, b, c], 1), rtol=1e-4, atol=1e-5)


def split_mamba2(bidirectional, d_inner=32, n_groups=1, chunk_size=8):
    from statelab.layers.bidirectional import BidirectionalMamba2Mixer

    torch.manual_seed(4)
    m = BidirectionalMamba2Mixer(16, d_inner, 4, n_groups, 8, bidirectional=bidirectional, chunk_size=chunk_size)
    with torch.no_grad():  # spread the decays (A = 1..H at init): some heads forget within a few tokens
        m.A_log.add_(torch.linspace(-1.0, 1.5, m.n_heads))
        m.dt_bias.add_(1.0)
    return m


def run_with_grads(m, x, h0, conv0, segments, lengths):
    """y, state and the gradients of a fixed random functional of both w.r.t. inputs, state and parameters."""
    x, h0, conv0 = (t.detach().clone().requires_grad_(True) for t in (x, h0, conv0))
    m.zero_grad()
    y, (ssm, conv) = m(x, (h0, conv0), lengths=lengths, segments=segments)
    g = torch.Generator().manual_seed(7)
    wy, ws = torch.randn(y.shape, generator=g), torch.randn(ssm.shape, generator=g)
    if lengths is not None:  # outputs at padded positions are not part of the contract
        wy = wy * (torch.arange(y.shape[1])[None] < lengths[:, None])[..., None]
    ((y * wy).sum() + (ssm * ws).sum()).backward()
    grads = {"x": x.grad, "h0": h0.grad, "conv0": conv0.grad}
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return y, ssm, conv, grads


@pytest.mark.parametrize(
    "bidirectional, d_inner, n_groups",
    [(False, 32, 1), (True, 32, 1), (True, 32, 2), (True, 48, 3)],  # groups: shared, split whole, straddling
)
@pytest.mark.parametrize("ragged", [False, True])
def test_split_mamba2_chunk_backend_equals_the_naive_scan_with_gradients(bidirectional, d_inner, n_groups, ragged):
    m = split_mamba2(bidirectional, d_inner, n_groups)
    assert m.backend == "chunk"
    B, T = 3, 37  # T not a multiple of the chunk (8); several packed samples per row, random prefixes
    seq_start, is_prefix = masks(B, T, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, T, 16, generator=g)
    h0 = torch.randn(B, m.state_heads, m.head_dim, m.d_state, generator=g)
    conv0 = torch.randn(B, m.conv_dim, m.d_conv - 1, generator=g)
    lengths = torch.tensor([T, 20, 9]) if ragged else None
    segments = Segments(seq_start, is_prefix)
    y, ssm, conv, grads = run_with_grads(m, x, h0, conv0, segments, lengths)
    m.backend = "naive"
    y_ref, ssm_ref, conv_ref, grads_ref = run_with_grads(m, x, h0, conv0, segments, lengths)
    real = slice(None) if lengths is None else torch.arange(T)[None] < lengths[:, None]
    assert_close("y", y_ref[real], y[real], rtol=1e-4, atol=1e-5)
    assert_close("ssm state", ssm_ref, ssm, rtol=1e-4, atol=1e-5)
    assert_close("conv state", conv_ref, conv)
    for name, ref in grads_ref.items():
        assert ref is not None and torch.isfinite(grads[name]).all(), name
        assert_close(f"grad {name}", ref, grads[name], rtol=1e-4, atol=1e-4)


def test_split_mamba2_chunk_backend_rows_equal_rows_alone_and_chunking_is_invisible():
    m = split_mamba2(True, chunk_size=5)
    T = 23
    seq_start, is_prefix = masks(2, T, seed=8)
    x = torch.randn(2, T, 16)
    lengths = torch.tensor([T, 14])
    with torch.no_grad():
        y, (ssm, conv) = m(x, None, lengths=lengths, segments=Segments(seq_start, is_prefix))
        for b in range(2):
            n = int(lengths[b])
            yb, (sb, cb) = m(
                x[b : b + 1, :n], None, segments=Segments(seq_start[b : b + 1, :n], is_prefix[b : b + 1, :n])
            )
            assert_close(f"row {b} y", yb[0], y[b, :n], rtol=1e-4, atol=1e-5)
            assert_close(f"row {b} state", sb[0], ssm[b], rtol=1e-4, atol=1e-5)
        for q in (1, 7, 64):  # one token per chunk, a ragged last chunk, one chunk for the whole call
            m.chunk_size = q
            yq, (sq, _) = m(x, None, lengths=lengths, segments=Segments(seq_start, is_prefix))
            real = torch.arange(T)[None] < lengths[:, None]
            assert_close(f"Q={q} y", y[real], yq[real], rtol=1e-4, atol=1e-5)
            assert_close(f"Q={q} state", ssm, sq, rtol=1e-4, atol=1e-5)

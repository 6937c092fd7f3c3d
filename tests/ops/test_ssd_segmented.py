"""The chunked SSD scan with resets (statelab.ops.ssd.segmented) against a per-token loop, and its exactness at
resets: decays across a reset are exact zeros and gradients stay finite."""

import pytest
import torch

from statelab.ops.ssd.segmented import segment_sums, ssd_scan_segmented
from statelab.testing import assert_close

INF = float("inf")


def loop(u, log_a, Bm, Cm, h0):
    """h_t = exp(log_a_t) h_{t-1} + u_t ⊗ B_t, y_t = h_t C_t, one token at a time (fp64)."""
    B, T, H, P = u.shape
    R = H // Bm.shape[2]
    Bh, Ch = Bm.double().repeat_interleave(R, 2), Cm.double().repeat_interleave(R, 2)
    h = torch.zeros(B, H, P, Bm.shape[3], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(T):
        h = torch.exp(log_a[:, t].double())[..., None, None] * h + u[:, t, ..., None].double() * Bh[:, t, :, None]
        ys.append((h * Ch[:, t, :, None]).sum(-1))
    return torch.stack(ys, 1), h


def inputs(B=2, T=29, H=4, P=3, G=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_a = -torch.rand(B, T, H, generator=g) * 3
    log_a[0, 0] = -INF  # a reset at the first token, at a chunk start (8), inside a chunk and twice in a row
    log_a[0, 8] = -INF
    log_a[1, 13:15] = -INF
    log_a[1, 21:, :2] = 0.0  # pass-through tokens
    u = torch.randn(B, T, H, P, generator=g)
    Bm, Cm = torch.randn(B, T, G, N, generator=g), torch.randn(B, T, G, N, generator=g)
    return u, log_a, Bm, Cm, torch.randn(B, H, P, N, generator=g)


def test_segment_sums_are_sums_never_differences():
    a = torch.tensor([-0.5, -INF, -1e-7, -3000.0, -2e-7])
    s = segment_sums(a)
    for i in range(5):
        for j in range(5):
            want = torch.tensor(0.0 if j <= i else -INF)
            for k in range(j + 1, i + 1):  # the loop's order, in fp32
                want = want + a[k]
            assert s[i, j].item() == want.item(), (i, j)
    # a short segment after a long one keeps its digits (a difference of running sums would round it to 0)
    assert s[4, 3].item() == a[4].item() and s[2, 1].item() == a[2].item()
    assert not torch.isnan(s).any()


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
def test_scan_equals_the_loop(chunk_size):
    u, log_a, Bm, Cm, h0 = inputs()
    y_ref, h_ref = loop(u, log_a, Bm, Cm, h0)
    y, h = ssd_scan_segmented(u, log_a, Bm, Cm, h0, chunk_size)
    assert y.dtype == h.dtype == torch.float32
    assert_close("y", y_ref.float(), y, rtol=1e-5, atol=1e-5)
    assert_close("state", h_ref.float(), h, rtol=1e-5, atol=1e-5)


def test_a_reset_cuts_exactly_and_gradients_are_finite():
    u, log_a, Bm, Cm, h0 = inputs()
    leaves = [t.clone().requires_grad_(True) for t in (u, log_a, Bm, Cm, h0)]
    y, h = ssd_scan_segmented(*leaves, chunk_size=8)
    (y.square().sum() + h.sum()).backward()
    for name, t in zip(["u", "log_a", "Bm", "Cm", "h0"], leaves, strict=True):
        assert torch.isfinite(t.grad).all(), name
    # nothing before the reset at token 8 of row 0 reaches token 8 or later: not the tokens, not the initial state
    assert (leaves[4].grad[0] == 0).all()
    u2 = u.clone()
    u2[0, :8] += 5.0
    y2, h2 = ssd_scan_segmented(u2, log_a, Bm, Cm, h0 * 3, chunk_size=8)
    assert torch.equal(y2[0, 8:], y[0, 8:].detach()) and torch.equal(h2[0], h[0].detach())


def test_bad_shapes_are_refused():
    u, log_a, Bm, Cm, _ = inputs()
    with pytest.raises(ValueError, match="H % G == 0"):
        ssd_scan_segmented(u, log_a, Bm[:, :, :1].expand(-1, -1, 3, -1), Cm[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan_segmented(u, log_a, Bm, Cm, chunk_size=0)

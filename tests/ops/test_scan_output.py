"""One result convention for every scan: a ScanOutput whose states_at stacks, on axis 1, the state after the first
p tokens for each requested p in [0, T] (0: the initial state, T: the final state), in the order asked."""

import pytest
import torch
import torch.nn.functional as F

from statelab.ops import ScanOutput
from statelab.ops.diag_scan import diag_scan
from statelab.ops.linear_scan import linear_scan
from statelab.ops.selective_scan import selective_scan
from statelab.ops.ssd import ssd_scan

B, T = 2, 9


def _selective(backend, h0, pos):
    g = torch.Generator().manual_seed(0)
    D, N = 3, 4
    u, Bm, Cm = torch.randn(B, T, D, generator=g), torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    delta = F.softplus(torch.randn(B, T, D, generator=g))
    A = -torch.rand(D, N, generator=g) - 0.1
    return selective_scan(u, delta, A, Bm, Cm, None, h0, True, pos, backend=backend)


def _ssd(backend, h0, pos):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 2, 3, generator=g)
    dt = F.softplus(torch.randn(B, T, 2, generator=g))
    Bm, Cm = torch.randn(B, T, 1, 4, generator=g), torch.randn(B, T, 1, 4, generator=g)
    return ssd_scan(x, dt, -torch.rand(2, generator=g), Bm, Cm, None, h0, True, pos, chunk_size=4, backend=backend)


def _diag(backend, h0, pos):
    g = torch.Generator().manual_seed(2)
    x, gate = torch.randn(B, T, 3, 4, generator=g), torch.randn(B, T, 4, generator=g)
    return diag_scan(x, -torch.rand(3, 4, generator=g), gate, h0, True, pos, backend=backend, chunk_size=4)


def _linear(backend, h0, pos):
    g = torch.Generator().manual_seed(3)
    return linear_scan(-torch.rand(B, T, 5, generator=g), torch.randn(B, T, 5, generator=g), h0, True, pos, backend)


OPS = {
    "selective_scan": (_selective, ("naive", "chunk"), (3, 4)),
    "ssd": (_ssd, ("naive", "chunk"), (2, 3, 4)),
    "diag_scan": (_diag, ("naive", "chunk"), (3, 4)),
    "linear_scan": (_linear, ("naive", "parallel"), (5,)),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_scan_returns_states_at_positions_the_same_way(op):
    run, backends, shape = OPS[op]
    h0 = torch.randn(B, *shape, generator=torch.Generator().manual_seed(9))
    pos = [T, 0, 4, 4]
    for backend in backends:
        out = run(backend, h0, pos)
        assert isinstance(out, ScanOutput), backend
        assert out.states_at.shape == (B, len(pos), *shape), backend
        assert torch.equal(out.states_at[:, 1], h0.float()), backend
        assert torch.allclose(out.states_at[:, 0], out.final_state, atol=1e-6), backend
        assert torch.equal(out.states_at[:, 2], out.states_at[:, 3]), backend
        prefix = run(backend, h0, [4]).states_at[:, 0]
        assert torch.equal(prefix, out.states_at[:, 2]), backend
        if out.sum_delta is not None:
            assert out.sum_delta_at.shape == (B, len(pos), *out.sum_delta.shape[1:])
            assert not out.sum_delta_at[:, 1].any() and torch.allclose(out.sum_delta_at[:, 0], out.sum_delta)
        with pytest.raises(ValueError, match="return_states_at must lie in"):
            run(backend, h0, [T + 1])

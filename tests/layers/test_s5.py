import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.layers.s5 import S5Layer, diagonal_scan
from statelab.testing import assert_close


def _layer():
    torch.manual_seed(0)
    layer = S5Layer(5, d_state=6)
    with torch.no_grad():
        layer.log_step.uniform_(-2.0, -0.5)
    return layer


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 8), (13, 32)], ids=str)
def test_diagonal_scan_chunk_equals_naive_with_gradients(T, chunk):
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
        h = diagonal_scan(b, log_decay, h0, backend, chunk_size=chunk)
        h.abs().pow(2).sum().backward()
        outs.append((h.detach(), b.grad.clone(), log_decay.grad.clone(), h0.grad.clone()))
    for name, x, y in zip(["h", "grad b", "grad decay", "grad h0"], *outs, strict=True):
        assert torch.allclose(x, y, atol=1e-10), name


def test_layer_chunk_equals_naive_and_continues():
    layer = _layer()
    u = torch.randn(3, 11, 5)
    y, h = layer(u)
    y_n, h_n = layer(u, backend="naive")
    assert_close("y", y_n, y, atol=1e-5, rtol=1e-4)
    assert torch.allclose(h, h_n, atol=1e-5)
    a, ha = layer(u[:, :4])
    b, hb = layer(u[:, 4:], ha)
    assert_close("continued", y, torch.cat([a, b], 1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(h, hb, atol=1e-5)
    steps, state = [], None
    for t in range(11):
        o, state = layer(u[:, t : t + 1], state, backend="naive")
        steps.append(o)
    assert_close("token by token", y, torch.cat(steps, 1), atol=1e-5, rtol=1e-4)


def test_stable_decay_and_state_check():
    log_decay, _ = _layer().discretise()
    assert (log_decay.real < 0).all()
    with pytest.raises(StateMismatchError):
        _layer()(torch.zeros(2, 3, 5), torch.zeros(2, 6))

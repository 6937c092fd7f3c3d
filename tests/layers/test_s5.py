import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.layers.s5 import S5Layer
from statelab.testing import assert_close


def _layer():
    torch.manual_seed(0)
    layer = S5Layer(5, d_state=6)
    with torch.no_grad():
        layer.log_step.uniform_(-2.0, -0.5)
    return layer


def test_layer_chunk_equals_naive_and_continues():
    layer = _layer()
    u = torch.randn(3, 11, 5)
    y, h = layer(u)
    layer.backend = "naive"
    y_n, h_n = layer(u)
    layer.backend = "chunk"
    assert_close("y", y_n, y, atol=1e-5, rtol=1e-4)
    assert torch.allclose(h, h_n, atol=1e-5)
    a, ha = layer(u[:, :4])
    b, hb = layer(u[:, 4:], ha)
    assert_close("continued", y, torch.cat([a, b], 1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(h, hb, atol=1e-5)
    steps, state = [], None
    layer.backend = "naive"
    for t in range(11):
        o, state = layer(u[:, t : t + 1], state)
        steps.append(o)
    assert_close("token by token", y, torch.cat(steps, 1), atol=1e-5, rtol=1e-4)


def test_stable_decay_and_state_check():
    log_decay, _ = _layer().discretise()
    assert (log_decay.real < 0).all()
    with pytest.raises(StateMismatchError):
        _layer()(torch.zeros(2, 3, 5), torch.zeros(2, 6))

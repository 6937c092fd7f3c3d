import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.eval.gd_reference import gd_prefix_predict
from statelab.layers.linear_attention import LinearSelfAttention
from statelab.tasks.regression import RegressionConfig, make_regression_batch
from statelab.testing import assert_close


def _layer():
    torch.manual_seed(0)
    return LinearSelfAttention(6, n_heads=2, d_key=3, d_value=4).double()


def test_parallel_equals_naive_outputs_state_and_gradients():
    layer = _layer()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    res = {}
    for backend in ("naive", "parallel"):
        layer.zero_grad()
        x.grad = s0.grad = None
        layer.backend = backend
        y, s = layer(x, s0)
        (y.pow(2).sum() + s.sum()).backward()
        res[backend] = (y.detach(), s.detach(), x.grad.clone(), s0.grad.clone(), layer.q.grad.clone())
    for name, a, b in zip(["y", "state", "grad x", "grad s0", "grad q"], res["naive"], res["parallel"], strict=True):
        assert_close(name, a, b)


@pytest.mark.parametrize("split", [1, 4, 8])
def test_continuation(split):
    layer = _layer()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    full, s_full = layer(x)
    a, s = layer(x[:, :split])
    keep = s.clone()
    b, s2 = layer(x[:, split:], s)
    assert torch.equal(s, keep)
    assert_close("continued", full, torch.cat([a, b], dim=1))
    assert_close("state", s_full, s2)


def test_windowed_lsa_expresses_one_gd_step():
    d, eta = 4, 3.0
    b = make_regression_batch(RegressionConfig(d=d, n_examples=7), 0, 5, dtype=torch.float64)
    windows = torch.cat([b.context_x, b.context_y, b.x[:, 1:]], dim=-1)  # [x_i; y_i; x_{i+1}]
    layer = LinearSelfAttention(3 * d, d_key=d, d_value=d).double()
    eye, zero = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    with torch.no_grad():
        layer.k.copy_(torch.cat([eye, zero, zero], 1))
        layer.q.copy_(torch.cat([zero, zero, eye], 1))
        layer.v.copy_(torch.cat([zero, eye, zero], 1) * eta / 7)
        layer.o.copy_(torch.cat([eye, zero, zero], 0))
    y, _ = layer(windows)
    assert_close("LSA = GD", gd_prefix_predict(b.x, b.context_y, eta / 7), y[..., :d])


def test_wrong_state_is_an_error():
    with pytest.raises(StateMismatchError):
        _layer()(torch.zeros(2, 3, 6, dtype=torch.float64), torch.zeros(2, 1, 4, 3, dtype=torch.float64))

import pytest
import torch

from statelab.errors import ConfigError, StateMismatchError
from statelab.layers.attention import CausalSelfAttention
from statelab.testing import assert_close


def _layer():
    torch.manual_seed(0)
    return CausalSelfAttention(8, n_heads=2).double()


def test_parallel_equals_naive_with_gradients_including_the_cache():
    layer = _layer()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    res = {}
    for backend in ("naive", "parallel"):
        x.grad = k0.grad = v0.grad = None
        layer.zero_grad()
        layer.backend = backend
        y, (k, v) = layer(x, (k0, v0))
        (y.pow(2).sum() + k.sum() + v.pow(2).sum()).backward()
        res[backend] = (y.detach(), x.grad.clone(), k0.grad.clone(), v0.grad.clone(), layer.qkv.weight.grad.clone())
    for name, a, b in zip(
        ["y", "grad x", "grad k0", "grad v0", "grad qkv"], res["naive"], res["parallel"], strict=True
    ):
        assert_close(name, a, b)


@pytest.mark.parametrize("split", [1, 5])
def test_continuation_and_token_by_token(split):
    layer = _layer()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    full, (k, _) = layer(x)
    a, s = layer(x[:, :split])
    b, (k2, _) = layer(x[:, split:], s)
    assert_close("continued", full, torch.cat([a, b], 1))
    assert_close("cache", k, k2)
    outs, state = [], None
    for t in range(7):
        o, state = layer(x[:, t : t + 1], state)
        outs.append(o)
    assert_close("token by token", full, torch.cat(outs, 1))


def test_errors():
    with pytest.raises(ConfigError):
        CausalSelfAttention(7, n_heads=2)
    with pytest.raises(StateMismatchError):
        _layer()(torch.zeros(1, 2, 8, dtype=torch.float64), (torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4)))

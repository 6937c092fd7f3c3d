import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.layers.hawk import HawkLayer, bounded_sqrt

from ._recurrent_checks import check_continuation, check_naive_equals_chunked, check_prompt_then_decode


def layer(bidirectional=False):
    torch.manual_seed(0)
    return HawkLayer(8, 6, conv_kernel=4, bidirectional=bidirectional)


def test_continuation():
    check_continuation(layer())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_naive_equals_chunked(bidirectional):
    check_naive_equals_chunked(layer(bidirectional))


def test_bidirectional_prompt_then_decode():
    check_prompt_then_decode(layer(True))


def test_sqrt_gradient_is_bounded():
    x = torch.tensor([0.0, 1e-12, 0.25], requires_grad=True)
    bounded_sqrt(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1000.0, 1000.0, 1.0]))


def test_decay_spans_the_rg_lru_range():
    a = torch.sigmoid(layer().Lambda) ** 8
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6


def test_bad_state_is_named():
    with pytest.raises(StateMismatchError, match="Hawk state"):
        layer()(torch.randn(1, 3, 8), (torch.zeros(1, 6), torch.zeros(1, 6, 2)))

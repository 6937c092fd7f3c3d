import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.layers.gated_ssm import GatedSSMLayer

from ._recurrent_checks import check_continuation, check_naive_equals_chunked, check_prompt_then_decode


def layer(bidirectional=False):
    torch.manual_seed(0)
    return GatedSSMLayer(8, 6, bidirectional=bidirectional)


def test_continuation():
    check_continuation(layer())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_naive_equals_chunked(bidirectional):
    check_naive_equals_chunked(layer(bidirectional))


def test_bidirectional_prompt_then_decode():
    check_prompt_then_decode(layer(True))


def test_bad_state_is_named():
    with pytest.raises(StateMismatchError, match="gated SSM state"):
        layer()(torch.randn(1, 3, 8), torch.zeros(1, 5))

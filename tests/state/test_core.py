import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.state.core import State


def make(B=2, L=3, D=4, N=5, W=3, arch="mamba1", fp="f" * 64, n=7):
    g = torch.Generator().manual_seed(0)
    return State(
        arch=arch,
        ssm=torch.randn(L, B, D, N, generator=g),
        conv=torch.randn(L, B, D, W, generator=g),
        sum_delta=torch.rand(L, B, D, generator=g),
        n_tokens=n,
        fingerprint=fp,
    )


def test_clone_shares_no_memory():
    s = make()
    c = s.clone()
    c.ssm.add_(1.0)
    assert not torch.equal(s.ssm, c.ssm)
    assert s.clone().equal(s)


def test_expand_and_select_are_copies():
    s = make(B=1)
    e = s.expand(4)
    assert e.batch_size == 4
    assert e.ssm.data_ptr() != s.ssm.data_ptr()
    e.ssm[:, 2].zero_()
    assert torch.equal(e.select(1).ssm, s.ssm)
    assert not torch.equal(e.select(2).ssm, s.ssm)


def test_select_rows_and_cat_roundtrip():
    s = make(B=3)
    parts = [s.select(i) for i in range(3)]
    assert State.cat(parts).equal(s)
    assert s.select([2, 0]).ssm[:, 0].equal(s.ssm[:, 2])
    with pytest.raises(StateMismatchError, match="out of range"):
        s.select(5)


def test_validation_errors():
    s = make()
    with pytest.raises(StateMismatchError, match="unknown state architecture"):
        s.replace(arch="rwkv")
    with pytest.raises(StateMismatchError, match="sum_delta must be float32"):
        s.replace(sum_delta=s.sum_delta.double())
    with pytest.raises(StateMismatchError, match="leads with"):
        s.replace(conv=s.conv[:, :1])
    with pytest.raises(StateMismatchError, match="different models"):
        State.cat([s, make(fp="0" * 64)])


def test_to_keeps_sum_delta_fp32():
    s = make().to(dtype=torch.bfloat16)
    assert s.dtype == torch.bfloat16 and s.sum_delta.dtype == torch.float32

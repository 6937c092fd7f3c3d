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


@pytest.mark.parametrize(
    "args, kwargs, dtype",
    [((torch.bfloat16,), {}, torch.bfloat16), (("cpu",), {}, torch.float32),
     ((torch.device("cpu"),), {}, torch.float32), (("cpu", torch.float16), {}, torch.float16),
     ((), {"device": "cpu", "dtype": torch.float64}, torch.float64),
     (("cpu",), {"dtype": torch.bfloat16}, torch.bfloat16),
     ((torch.zeros(1, dtype=torch.float16),), {}, torch.float16)],
    ids=["dtype", "device-str", "device", "device-dtype", "keywords", "device-kw-dtype", "tensor"],
)  # fmt: skip
def test_to_accepts_torch_call_shapes(args, kwargs, dtype):
    s = make()
    t = s.to(*args, **kwargs)
    assert t.dtype == dtype and t.conv.dtype == dtype and t.sum_delta.dtype == torch.float32
    assert t.device.type == "cpu" and torch.equal(t.ssm, s.ssm.to(dtype))
    assert s.dtype == torch.float32  # a new state; the original is unchanged


def test_to_refuses_what_a_state_cannot_be():
    s = make()
    with pytest.raises(StateMismatchError, match="floating point"):
        s.to(torch.int64)
    with pytest.raises(TypeError, match="two dtypes"):
        s.to(torch.float16, dtype=torch.float32)
    with pytest.raises(TypeError, match="device, a dtype or a tensor"):
        s.to(3.5)
    with pytest.raises(TypeError, match="at most"):
        s.to("cpu", torch.float16, True)


# ---- per-row token counts (ragged batches) ---------------------------------------------------------------------
def test_token_counts_per_row():
    s = make(B=3, n=[4, 9, 4])
    assert s.ragged and s.tokens == (4, 9, 4) and s.n_tokens == (4, 9, 4)
    u = make(B=3, n=[5, 5, 5])
    assert not u.ragged and u.n_tokens == 5 and u.tokens == (5, 5, 5)  # the simple case stays an int
    assert make(B=2, n=torch.tensor([1, 2])).tokens == (1, 2)
    assert "n_tokens=(4, 9, 4)" in repr(s)


def test_select_expand_cat_keep_each_rows_count():
    s = make(B=3, n=[4, 9, 2])
    assert s.select(1).n_tokens == 9 and s.select([2, 0]).tokens == (2, 4)
    assert s.select(slice(1, 3)).tokens == (9, 2) and s.select(torch.tensor([0, 1])).tokens == (4, 9)
    assert s.select(-1).n_tokens == 2
    assert s.expand(2).tokens == (4, 4, 9, 9, 2, 2)
    parts = [s.select(i) for i in range(3)]
    back = State.cat(parts)
    assert back.equal(s) and back.tokens == (4, 9, 2)
    # states that consumed different token counts now batch (they were refused before ragged batches)
    a, b = make(B=1, n=3), make(B=2, n=[8, 1])
    c = State.cat([a, b])
    assert c.tokens == (3, 8, 1)
    assert torch.equal(c.ssm[:, 1:], b.ssm) and torch.equal(c.ssm[:, :1], a.ssm)


def test_equal_compares_per_row_counts():
    s = make(B=2, n=[3, 4])
    assert s.equal(s.clone())
    assert not s.equal(s.replace(n_tokens=[4, 3]))


def test_bad_token_counts_are_refused():
    with pytest.raises(StateMismatchError, match="3 counts but the state has 2 rows"):
        make(B=2, n=[1, 2, 3])
    with pytest.raises(StateMismatchError, match=">= 0"):
        make(B=2, n=[1, -2])
    with pytest.raises(StateMismatchError, match="must be ints"):
        make(B=2, n=[1, 2.5])
    with pytest.raises(StateMismatchError, match="int or one count per row"):
        make(B=2, n="12")
    with pytest.raises(StateMismatchError, match="int or one count per row"):
        make(B=2, n=True)


def test_architecture_registry_knows_every_model_state_and_refuses_a_conflict():
    from statelab.state.core import ARCH_LAYOUTS, ARCH_SSM_RANK, ArchLayout, register_arch

    for arch in ("mamba1", "mamba2", "birdie_gated_ssm", "birdie_hawk", "birdie_mamba2", "birdie_transformer"):
        assert ARCH_SSM_RANK[arch] == ARCH_LAYOUTS[arch].ssm_rank
    assert register_arch("mamba1", ARCH_LAYOUTS["mamba1"]) == ARCH_LAYOUTS["mamba1"]
    with pytest.raises(StateMismatchError, match="already registered"):
        register_arch("mamba1", ArchLayout(3))
    with pytest.raises(StateMismatchError, match="unknown state architecture"):
        State("rnn", torch.zeros(1, 1, 2), torch.zeros(1, 1, 0, 0), torch.zeros(1, 1, 0), 0, "")


def test_cat_pads_the_token_axis_of_caches():
    def cache(S, n):
        kv = torch.randn(2, 1, 3, S, 4)
        return State("birdie_transformer", kv, kv.clone(), torch.zeros(2, 1, 0), n, "fp")

    a, b = cache(5, 5), cache(2, 2)
    both = State.cat([a, b])
    assert both.tokens == (5, 2) and both.ssm.shape == (2, 2, 3, 5, 4)
    assert torch.equal(both.ssm[:, 1, :, :2], b.ssm[:, 0]) and not both.ssm[:, 1, :, 2:].any()
    assert a.layout_key == b.layout_key and a.layout != b.layout

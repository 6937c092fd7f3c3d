"""Mamba1LM: the state contract (continuation, positions, generation, scoring), configs and errors."""

import pytest
import torch

from statelab.errors import ConfigError, StateMismatchError
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.testing import assert_close

CFG = Mamba1Config(d_model=16, n_layer=3, vocab_size=29, d_state=4, d_conv=4, dt_rank="auto",
                   pad_vocab_size_multiple=8)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Mamba1LM(CFG).eval()
    with torch.no_grad():
        for block in m.layers:
            block.mixer.dt_proj.bias.add_(1.5)  # larger Δ: the state matters for the continuation tests
    return m


def _ids(T, B=2, seed=1):
    return torch.randint(0, 29, (B, T), generator=torch.Generator().manual_seed(seed))


def _close_states(a, b):
    for name in ("ssm", "conv", "sum_delta"):
        assert_close(name, getattr(a, name), getattr(b, name))
    assert a.n_tokens == b.n_tokens and a.fingerprint == b.fingerprint


@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_continuation(model, t):
    x = _ids(12)
    with torch.no_grad():
        whole, s_whole = model(x)
        l1, s1 = model(x[:, :t])
        l2, s2 = model(x[:, t:], state=s1)
        assert_close("prefix+suffix", whole, torch.cat([l1, l2], 1))
        _close_states(s_whole, s2)
    assert s_whole.n_tokens == 12 and s_whole.ssm.shape == (3, 2, 32, 4) and s_whole.conv.shape == (3, 2, 32, 3)


def test_token_by_token(model):
    x = _ids(12)
    with torch.no_grad():
        whole, s_whole = model(x)
        s, steps = None, []
        for i in range(12):
            lo, s = model(x[:, i : i + 1], state=s)
            steps.append(lo)
    assert_close("token-by-token", whole, torch.cat(steps, 1))
    _close_states(s_whole, s)


def test_vocab_padding_and_decay(model):
    logits, _ = model(_ids(3))
    assert logits.shape == (2, 3, 32) and CFG.padded_vocab_size == 32
    A = model.decay_A()
    assert A.shape == (3, 32, 4) and A.dtype == torch.float32 and bool((A < 0).all())


def test_positions_equal_separate_encodes(model):
    x = _ids(10, seed=2)
    s0 = model.encode(x[:, :4])
    states = model.encode(x[:, 4:], state=s0, positions=[1, 3, 6])
    for st, p in zip(states, [1, 3, 6], strict=True):
        _close_states(model.encode(x[:, : 4 + p]), st)
    _close_states(model.encode(x), states[-1])


def test_generate_greedy_batched_and_resumable(model):
    x = _ids(5, B=3, seed=3)
    toks, st, _ = model.generate(x, max_new_tokens=6)
    assert toks.shape == (3, 6) and st.n_tokens == 11
    # manual greedy loop
    seq = x
    for _ in range(6):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[:, 5:], toks)
    # the returned state is after the prompt and every new token: the same as encoding them
    t1, s1, _ = model.generate(x, max_new_tokens=3)
    assert torch.equal(t1, toks[:, :3])
    _close_states(model.encode(torch.cat([x, t1], 1)), s1)
    # continuing from the state with the next prompt equals one pass over everything
    more = _ids(2, B=3, seed=9)
    t2, _, _ = model.generate(more, max_new_tokens=2, state=s1)
    t2_ref, _, _ = model.generate(torch.cat([x, t1, more], 1), max_new_tokens=2)
    assert torch.equal(t2, t2_ref)


def test_score(model):
    x = _ids(8, seed=4)
    r = model.score(x)
    logits, _ = model(x)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
    assert_close("logprobs", lp, r.logprobs)
    assert_close("ppl", torch.exp(-lp.mean(1)), r.perplexity)


def test_state_errors(model):
    x = _ids(4)
    s = model.encode(x)
    with pytest.raises(StateMismatchError, match="batch size"):
        model(x[:1], state=s)
    other = Mamba1LM(CFG)
    with pytest.raises(StateMismatchError, match="not by this model"):
        other(x, state=s)
    with pytest.raises(StateMismatchError, match="dtype"):
        model(x, state=s.to(dtype=torch.float64))
    with pytest.raises(TypeError, match="integer"):
        model(x.float())


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown config key.*d_stat.*Mamba1Config"):
        Mamba1Config.from_dict({"d_model": 8, "n_layer": 1, "vocab_size": 5, "d_stat": 4})
    with pytest.raises(ConfigError, match="d_model"):
        Mamba1Config.from_dict({"d_model": "8", "n_layer": 1, "vocab_size": 5})
    with pytest.raises(ConfigError, match="dt_rank"):
        Mamba1Config(d_model=8, n_layer=1, vocab_size=5, dt_rank=0)
    c = Mamba1Config.from_dict(CFG.to_dict())
    assert c == CFG and c.dt_rank_value == 1


def test_training_gradients_reach_decay(model):
    x = _ids(20, seed=5)
    logits, st = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), x[:, 1:].reshape(-1))
    loss.backward()
    g = model.layers[0].mixer.A_log.grad
    assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_bf16_model_continuation():
    torch.manual_seed(1)
    m = Mamba1LM(CFG).to(torch.bfloat16).eval()
    x = _ids(9, seed=6)
    with torch.no_grad():
        whole, s = m(x)
        a, s1 = m(x[:, :4])
        b, _ = m(x[:, 4:], state=s1)
    assert s.dtype == torch.bfloat16 and s.sum_delta.dtype == torch.float32
    assert_close("bf16", whole.float(), torch.cat([a, b], 1).float(), rtol=5e-2, atol=5e-2)


def test_backend_is_a_validated_constructor_argument(model):
    torch.manual_seed(0)
    naive = Mamba1LM(CFG, backend="naive").eval()
    naive.load_state_dict(model.state_dict())
    assert naive.backend == "naive" and all(b.mixer.backend == "naive" for b in naive.layers)
    ids = _ids(9)
    with torch.no_grad():
        assert_close("naive == chunk", model(ids)[0], naive(ids)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        Mamba1LM(CFG, backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        naive.backend = "cuda"
    assert naive.backend == "naive"

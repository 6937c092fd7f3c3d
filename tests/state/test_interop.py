"""State <-> transformers 5.23 Mamba caches: conversions both ways, generation, and which continuation routes are
exact from an injected cache."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM  # noqa: E402

from statelab.errors import StateMismatchError  # noqa: E402
from statelab.models.loading import load_model  # noqa: E402
from statelab.state.interop import from_hf_cache, hf_arch, hf_generate, hf_step, to_hf_cache  # noqa: E402
from statelab.state.mix import mix  # noqa: E402
from statelab.testing import assert_close  # noqa: E402

V = 40


def _hf_mamba1(seed=0):
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=V,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        conv_kernel=4,
        eos_token_id=None,
        pad_token_id=0,
    )
    m = MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger Δ so that the state visibly matters
        for layer in m.backbone.layers:
            layer.mixer.dt_proj.bias.add_(1.0)
            layer.norm.weight.uniform_(0.5, 1.5)
    return m


def _hf_mamba2(seed=0):
    torch.manual_seed(seed)
    cfg = Mamba2Config(
        vocab_size=V, hidden_size=16, num_heads=4, head_dim=8, state_size=8, n_groups=2, num_hidden_layers=2,
        conv_kernel=4, chunk_size=4, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    m = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in m.backbone.layers:
            layer.mixer.dt_bias.add_(1.0)
            layer.mixer.A_log.copy_(torch.randn_like(layer.mixer.A_log))
            layer.norm.weight.uniform_(0.5, 1.5)
    return m


BUILDERS = {"mamba1": _hf_mamba1, "mamba2": _hf_mamba2}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    hf = BUILDERS[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, load_model(d)


def ids(T, B=2, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def scale(t):
    return 1e-5 * float(t.detach().abs().max())


def test_round_trip_keeps_the_state(pair):
    hf, ours = pair
    s = ours.encode(ids(9))
    back = from_hf_cache(to_hf_cache(s, hf), ours, n_tokens=s.n_tokens, sum_delta=s.sum_delta)
    assert back.equal(s)
    cache = to_hf_cache(s, hf)
    K = hf.config.conv_kernel
    assert cache.layers[0].conv_states[0].shape[-1] == K, "transformers keeps K conv columns"
    assert not cache.layers[0].conv_states[0][..., 0].any(), "the unused oldest column is zero"
    assert cache.layers[0].conv_states[0].data_ptr() != s.conv.data_ptr()


def test_statelab_state_drives_transformers_generate(pair):
    hf, ours = pair
    x = ids(14, seed=1)
    prefix = ours.encode(x[:, :9])
    want, _, _ = ours.generate(x[:, 9:], max_new_tokens=8, state=prefix)
    got, _ = hf_generate(hf, x[:, 9:], prefix, max_new_tokens=8)
    assert torch.equal(want, got)
    plain, _ = hf_generate(hf, x, max_new_tokens=8)
    assert torch.equal(plain, got), "continuing from the state == transformers reading the whole prompt"


def test_transformers_cache_continues_in_statelab(pair):
    hf, ours = pair
    x = ids(15, seed=2)
    with torch.no_grad():
        cache = hf(x[:, :10], use_cache=True).cache_params  # a prefill from zero is exact in transformers
    s = from_hf_cache(cache, ours, n_tokens=10)
    ref = ours.encode(x[:, :10])
    assert_close("ssm", ref.ssm, s.ssm, atol=scale(ref.ssm))
    assert_close("conv", ref.conv, s.conv, atol=scale(ref.conv))
    assert torch.isnan(s.sum_delta).all() and s.n_tokens == 10 and s.fingerprint == ours.fingerprint
    full, _ = ours(x)
    got, after = ours(x[:, 10:], s)
    assert_close("logits", full[:, 10:], got, atol=scale(full))
    assert after.n_tokens == 15
    # order-free mixing takes an imported state, ordered composition asks for its ΣΔ
    assert torch.isnan(mix([s, ref], "mean").sum_delta).all()
    with pytest.raises(StateMismatchError, match="ΣΔ is unknown"):
        mix([ref, s], "adecay", A=ours.decay_A())
    # greedy continuation: transformers from its own cache == statelab from the imported state
    with torch.no_grad():
        cache = hf(x[:, :10], use_cache=True).cache_params
    want, _, _ = ours.generate(x[:, 10:], max_new_tokens=6, state=s)
    hf_step(hf, x[:, 10:14], cache)
    seq = hf.generate(x[:, 14:], cache_params=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(want, seq[:, 1:])


def test_one_token_per_call_is_exact(pair):
    hf, ours = pair
    x = ids(13, seed=3)
    full, _ = ours(x)
    cache = to_hf_cache(ours.encode(x[:, :5]), hf)
    got = hf_step(hf, x[:, 5:], cache)
    assert_close("logits", full[:, 5:], got, atol=scale(full))
    after = from_hf_cache(cache, ours, n_tokens=13)
    assert_close("ssm after", ours.encode(x).ssm, after.ssm, atol=scale(after.ssm))


def test_multi_token_calls_from_an_injected_cache(pair):
    """Documents transformers 5.23: on a multi-token call from a cache, Mamba-1 uses the cached conv window but
    restarts its selective scan from a zero SSM state (wrong: it equals statelab's ``conv_context`` chunk
    encoding); Mamba-2 continues its chunked scan from the cache (exact)."""
    hf, ours = pair
    x = ids(13, seed=4)
    cache = to_hf_cache(ours.encode(x[:, :5]), hf)
    with torch.no_grad():
        hf(x[:, 5:], cache_params=cache, use_cache=True)
    got = from_hf_cache(cache, ours, n_tokens=13)
    true = ours.encode(x)
    restarted = ours.encode(x[:, 5:], conv_context=x[:, :5])
    if hf_arch(hf) == "mamba1":
        assert_close("zero-restart", restarted.ssm, got.ssm, atol=scale(restarted.ssm))
        assert float((got.ssm - true.ssm).abs().max()) > 1e3 * scale(true.ssm)
    else:
        assert_close("exact", true.ssm, got.ssm, atol=scale(true.ssm))


def test_errors(pair):
    hf, ours = pair
    s = ours.encode(ids(4))
    with pytest.raises(StateMismatchError, match="state has 1 layers, the transformers model 2"):
        to_hf_cache(s.replace(ssm=s.ssm[:1], conv=s.conv[:1], sum_delta=s.sum_delta[:1]), hf)
    with pytest.raises(StateMismatchError, match="does not fit"):
        to_hf_cache(s.replace(conv=s.conv[..., :1]), hf)

    class NotMamba:
        config = type("C", (), {"model_type": "llama"})()

    with pytest.raises(StateMismatchError, match="model_type 'mamba' or 'mamba2'.*llama"):
        to_hf_cache(s, NotMamba())
    from transformers import DynamicCache

    with pytest.raises(StateMismatchError, match="no conv/SSM state"):
        from_hf_cache(DynamicCache(config=hf.config), ours, n_tokens=0)
    with pytest.raises(StateMismatchError, match="batch size"):
        hf_generate(hf, ids(3, B=3), s, max_new_tokens=2)
    assert not math.isnan(float(s.sum_delta.sum()))

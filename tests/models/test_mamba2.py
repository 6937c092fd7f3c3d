"""Mamba2LM: the state contract (continuation, positions, generation), configs, checkpoints and errors."""

import json

import pytest
import torch

from statelab.errors import CheckpointError, ConfigError, StateMismatchError
from statelab.models.loading import load_model
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.testing import assert_close

CFG = Mamba2Config(vocab_size=31, d_model=12, n_layer=3, d_state=8, head_dim=6, n_groups=2, d_conv=4,
                   tie_embeddings=True)  # fmt: skip


def _randomise(m, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in m.layers:
            block.mixer.A_log.copy_(torch.randn_like(block.mixer.A_log))
            block.mixer.dt_bias.add_(1.5)  # larger Δ: the state matters for the continuation tests
            block.mixer.D.copy_(torch.randn_like(block.mixer.D))
    for block in m.layers:
        block.mixer.chunk_size = 4
    return m.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _randomise(Mamba2LM(CFG))


def _ids(T, B=2, seed=1):
    return torch.randint(0, 31, (B, T), generator=torch.Generator().manual_seed(seed))


def _close_states(a, b):
    for name in ("ssm", "conv", "sum_delta"):
        assert_close(name, getattr(a, name), getattr(b, name))
    assert a.n_tokens == b.n_tokens and a.fingerprint == b.fingerprint


@pytest.mark.parametrize("t", [1, 2, 3, 7], ids=lambda t: f"t{t}")
def test_continuation(model, t):
    x = _ids(13)
    with torch.no_grad():
        whole, s_whole = model(x)
        l1, s1 = model(x[:, :t])
        l2, s2 = model(x[:, t:], state=s1)
        assert_close("prefix+suffix", whole, torch.cat([l1, l2], 1))
        _close_states(s_whole, s2)
        s, steps = None, []
        for i in range(13):
            lo, s = model(x[:, i : i + 1], state=s)
            steps.append(lo)
        assert_close("token-by-token", whole, torch.cat(steps, 1))
        _close_states(s_whole, s)
    H = CFG.n_heads
    assert s_whole.n_tokens == 13 and s_whole.ssm.shape == (3, 2, H, 6, 8)
    assert s_whole.conv.shape == (3, 2, CFG.conv_dim, 3) and s_whole.sum_delta.shape == (3, 2, H)


def test_naive_backend_gives_the_same_logits(model):
    x = _ids(11)
    ref, s_ref = model(x)
    model.backend = "naive"
    try:
        got, s_got = model(x)
    finally:
        model.backend = "chunk"
    assert_close("logits", ref, got)
    _close_states(s_ref, s_got)
    with pytest.raises(ValueError, match="unknown backend"):
        model.backend = "fast"


def test_positions_equal_separate_encodes(model):
    x = _ids(10, seed=2)
    s0 = model.encode(x[:, :4])
    states = model.encode(x[:, 4:], state=s0, positions=[1, 3, 6])
    for st, p in zip(states, [1, 3, 6], strict=True):
        _close_states(model.encode(x[:, : 4 + p]), st)
    _close_states(model.encode(x), states[-1])


def test_generate_greedy_matches_a_manual_loop_and_resumes(model):
    x = _ids(5, B=3, seed=3)
    toks, st, _ = model.generate(x, max_new_tokens=6)
    assert toks.shape == (3, 6) and st.n_tokens == 11
    seq = x
    for _ in range(6):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[:, 5:], toks)
    _close_states(model.encode(seq), st)


def test_decay_and_state_checks(model):
    A = model.decay_A()
    assert A.shape == (3, CFG.n_heads) and A.dtype == torch.float32 and bool((A < 0).all())
    s = model.encode(_ids(4))
    with pytest.raises(StateMismatchError, match="batch size"):
        model(_ids(4, B=3), state=s)
    other = _randomise(Mamba2LM(CFG), seed=5)
    with pytest.raises(StateMismatchError, match="not by this model"):
        other(_ids(4), state=s)
    with pytest.raises(StateMismatchError):
        model(_ids(4), state=s.replace(arch="mamba1", ssm=s.ssm[:, :, 0], sum_delta=s.sum_delta))


def test_config_is_typed_and_strict():
    with pytest.raises(ConfigError, match="unknown config key.*d_ssm.*Mamba2Config"):
        Mamba2Config.from_dict({**CFG.to_dict(), "d_ssm": 4})
    with pytest.raises(ConfigError, match="d_model must be a positive int"):
        Mamba2Config(vocab_size=10, d_model="12", n_layer=1)
    with pytest.raises(ConfigError, match="multiple of head_dim"):
        Mamba2Config(vocab_size=10, d_model=10, n_layer=1, head_dim=6)
    with pytest.raises(ConfigError, match="multiple of n_groups"):
        Mamba2Config(vocab_size=10, d_model=12, n_layer=1, head_dim=6, n_groups=3)
    assert Mamba2Config.from_dict(CFG.to_dict()) == CFG


def test_bf16_cast_keeps_decay_parameters_fp32(tmp_path, model):
    model.save_pretrained(tmp_path)
    m = load_model(tmp_path, dtype=torch.bfloat16)
    mixer = m.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    logits, st = m(_ids(6))
    ref, _ = model(_ids(6))
    assert st.sum_delta.dtype == torch.float32
    assert_close("bf16 logits", ref, logits, rtol=0.1, atol=0.15)


def test_save_load_round_trip_is_exact(tmp_path, model):
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert again.fingerprint == model.fingerprint
    for block in again.layers:
        block.mixer.chunk_size = 4  # same chunking as the fixture: bitwise equal
    x = _ids(9)
    assert torch.equal(model(x)[0], again(x)[0])


def _write_mamba_ssm(directory, model, vocab_size, mult):
    """A mamba_ssm-format checkpoint (config.json + pytorch_model.bin) with the weights of ``model``."""
    c = model.config
    cfg = {
        "d_model": c.d_model, "d_intermediate": 0, "n_layer": c.n_layer, "vocab_size": vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.d_state, "d_conv": c.d_conv, "expand": c.expand,
                    "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": 8},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": mult, "tie_embeddings": c.tie_embeddings,
    }  # fmt: skip
    sd = {}
    for k, v in model.hf_state_dict().items():
        sd[k.replace("backbone.embeddings.", "backbone.embedding.")] = v.clone()
    if c.tie_embeddings:  # mamba_ssm saves the tied head as its own key
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, directory / "pytorch_model.bin")


def test_mamba_ssm_checkpoint_loads(tmp_path, model):
    # vocab 29 padded to a multiple of 31 = 31 rows, as mamba_ssm pads
    _write_mamba_ssm(tmp_path / "ms", model, vocab_size=29, mult=31)
    m = load_model(tmp_path / "ms")
    assert m.config.vocab_size == 31 and m.config.chunk_size == 8
    x = _ids(7)
    assert_close("logits", model(x)[0], m(x)[0])


def test_mamba_ssm_unsupported_variants_are_refused(tmp_path, model):
    _write_mamba_ssm(tmp_path, model, vocab_size=31, mult=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_intermediate"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="d_intermediate"):
        load_model(tmp_path)


def test_checkpoint_errors(tmp_path, model):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    bad = dict(sd)
    bad.pop("backbone.layers.1.mixer.dt_bias")
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing weights \['layers.1.mixer.dt_bias'\]"):
        load_model(tmp_path)
    bad = dict(sd)
    bad["backbone.layers.0.mixer.D"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(tmp_path)
    bad = dict(sd)
    bad["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected weights"):
        load_model(tmp_path)


def test_new_state_shares_no_memory_with_the_given_one(model):
    s = model.encode(_ids(5))
    before = s.clone()
    with torch.no_grad():
        _, s1 = model(_ids(1, seed=7), s)
        _, s2 = model(_ids(3, seed=7), s)
    assert s.equal(before)
    for new in (s1, s2):
        assert new.ssm.data_ptr() != s.ssm.data_ptr() and new.conv.data_ptr() != s.conv.data_ptr()

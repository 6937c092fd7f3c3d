import pytest
import torch

from statelab.errors import ConfigError, StateMismatchError
from statelab.models.birdie_models import BirdieLM, BirdieModelConfig
from statelab.testing import assert_close

ARCH = ["gated_ssm", "hawk", "transformer", "mamba2"]


def model(arch, bidirectional=False):
    torch.manual_seed(0)
    cfg = BirdieModelConfig(
        arch=arch,
        vocab_size=40,
        d_model=16,
        n_layer=3,
        d_state=12,
        n_heads=2,
        bidirectional=bidirectional,
        mamba2_state=4,
        mamba2_head_dim=8,
    )
    return BirdieLM(cfg).eval()


@pytest.mark.parametrize("arch", ARCH)
def test_continuation(arch):
    m = model(arch)
    ids = torch.randint(0, 40, (2, 19))
    full, st = m(ids)
    a, s1 = m(ids[:, :7])
    b, s2 = m(ids[:, 7:], s1)
    assert_close("prefix+suffix", full, torch.cat([a, b], 1))
    assert s2.n_tokens == st.n_tokens == 19
    s, ys = None, []
    for t in range(19):
        y, s = m(ids[:, t : t + 1], s)
        ys.append(y)
    assert_close("token by token", full, torch.cat(ys, 1))


@pytest.mark.parametrize("arch", ARCH)
def test_bidirectional_suffix_never_sees_later_tokens_and_prefix_does(arch):
    m = model(arch, bidirectional=True)
    ids = torch.randint(0, 40, (1, 16))
    prefix = torch.zeros(1, 16, dtype=torch.bool)
    prefix[:, :7] = True
    base, _ = m(ids, None, None, prefix)
    for t in range(7, 15):
        ids2 = ids.clone()
        ids2[0, t + 1] = (ids[0, t + 1] + 1) % 40
        out, _ = m(ids2, None, None, prefix)
        assert_close(f"logits <= {t}", base[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
    ids3 = ids.clone()
    ids3[0, 5] = (ids[0, 5] + 1) % 40
    out, _ = m(ids3, None, None, prefix)
    assert not torch.allclose(out[:, :5], base[:, :5])


@pytest.mark.parametrize("arch", ARCH)
def test_packed_row_equals_samples_one_by_one(arch):
    m = model(arch, bidirectional=True)
    ids = torch.randint(0, 40, (1, 30))
    start = torch.zeros(1, 30, dtype=torch.bool)
    start[0, [0, 9, 21]] = True
    prefix = torch.zeros(1, 30, dtype=torch.bool)
    prefix[0, 0:4] = prefix[0, 9:17] = prefix[0, 21:23] = True
    packed, _ = m(ids, None, start, prefix)
    for s, e in ((0, 9), (9, 21), (21, 30)):
        one, _ = m(ids[:, s:e], None, start[:, s:e], prefix[:, s:e])
        assert_close(f"sample {s}:{e}", one, packed[:, s:e], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCH)
def test_generation_continues_from_the_prompt_state(arch):
    m = model(arch, bidirectional=True)
    prompt = torch.randint(0, 40, (2, 9))
    new = m.generate(prompt, 5)
    seq = torch.cat([prompt, new], 1)
    prefix = torch.zeros_like(seq, dtype=torch.bool)
    prefix[:, :8] = True  # the prompt minus its last token is the prefix
    logits, _ = m(seq, None, None, prefix)
    assert torch.equal(logits[:, 8:-1].argmax(-1), new)


def test_parameters_match_between_causal_and_bidirectional_and_errors():
    for arch in ARCH:
        assert model(arch).num_parameters() == model(arch, True).num_parameters()
    with pytest.raises(ConfigError, match="arch"):
        BirdieModelConfig(arch="rnn")
    m, h = model("hawk"), model("gated_ssm")
    _, st = m(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(StateMismatchError):
        h(torch.zeros(1, 3, dtype=torch.long), st)

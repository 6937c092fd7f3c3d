import pytest
import torch

from statelab.errors import ConfigError, StateMismatchError
from statelab.layers.protocol import Segments
from statelab.models.birdie_models import BirdieLM, BirdieModelConfig
from statelab.state.core import State
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
    base, _ = m(ids, None, segments=Segments(None, prefix))
    for t in range(7, 15):
        ids2 = ids.clone()
        ids2[0, t + 1] = (ids[0, t + 1] + 1) % 40
        out, _ = m(ids2, None, segments=Segments(None, prefix))
        assert_close(f"logits <= {t}", base[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
    ids3 = ids.clone()
    ids3[0, 5] = (ids[0, 5] + 1) % 40
    out, _ = m(ids3, None, segments=Segments(None, prefix))
    assert not torch.allclose(out[:, :5], base[:, :5])


@pytest.mark.parametrize("arch", ARCH)
def test_packed_row_equals_samples_one_by_one(arch):
    m = model(arch, bidirectional=True)
    ids = torch.randint(0, 40, (1, 30))
    start = torch.zeros(1, 30, dtype=torch.bool)
    start[0, [0, 9, 21]] = True
    prefix = torch.zeros(1, 30, dtype=torch.bool)
    prefix[0, 0:4] = prefix[0, 9:17] = prefix[0, 21:23] = True
    packed, _ = m(ids, None, segments=Segments(start, prefix))
    for s, e in ((0, 9), (9, 21), (21, 30)):
        one, _ = m(ids[:, s:e], None, segments=Segments(start[:, s:e], prefix[:, s:e]))
        assert_close(f"sample {s}:{e}", one, packed[:, s:e], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCH)
def test_generation_continues_from_the_prompt_state(arch):
    m = model(arch, bidirectional=True)
    prompt = torch.randint(0, 40, (2, 9))
    new = m.generate(prompt, 5).tokens
    seq = torch.cat([prompt, new], 1)
    prefix = torch.zeros_like(seq, dtype=torch.bool)
    prefix[:, :8] = True  # the prompt minus its last token is the prefix
    logits, _ = m(seq, None, segments=Segments(None, prefix))
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


# ---- the StatefulLM contract: one State type, ragged batches, encode, generate, files, store, mixing ------------

CASES = [(a, bi) for a in ARCH for bi in (False, True)]
CASE_IDS = [f"{a}-{'bi' if bi else 'causal'}" for a, bi in CASES]


@pytest.mark.parametrize("arch,bi", CASES, ids=CASE_IDS)
def test_is_a_stateful_lm_with_a_registered_state(arch, bi):
    from statelab.models.base import StatefulLM
    from statelab.state.core import ARCH_LAYOUTS, State

    m = model(arch, bi)
    assert isinstance(m, StatefulLM) and m.arch == f"birdie_{arch}" and m.arch in ARCH_LAYOUTS
    _, st = m(torch.randint(0, 40, (2, 6)))
    assert isinstance(st, State) and st.arch == m.arch and st.fingerprint == m.fingerprint
    assert st.tokens == (6, 6) and st.sum_delta.shape == (3, 2, 0)
    m.check_state(st, 2)
    zero = m.zero_state(2)
    assert zero.layout_key == st.layout_key and zero.n_tokens == 0


@pytest.mark.parametrize("arch,bi", CASES, ids=CASE_IDS)
def test_ragged_batch_rows_equal_rows_alone_from_a_ragged_state(arch, bi):
    m = model(arch, bi)
    g = torch.Generator().manual_seed(1)
    first = [torch.randint(0, 40, (n,), generator=g) for n in (3, 7)]
    states = [m(r[None])[1] for r in first]
    state = State.cat(states)
    assert state.tokens == (3, 7)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    lengths = torch.tensor([9, 4])
    logits, new = m(ids, state, lengths=lengths)
    assert new.tokens == (12, 11)
    for b in range(2):
        alone, st = m(ids[b : b + 1, : lengths[b]], states[b])
        assert_close(f"row {b} logits", alone[0], logits[b, : lengths[b]], rtol=1e-4, atol=1e-5)
        assert torch.equal(logits[b, lengths[b] :], torch.zeros_like(logits[b, lengths[b] :]))
        after, _ = m(ids[b : b + 1, :2], st)
        again, _ = m(ids[b : b + 1, :2], new.select(b))
        assert_close(f"row {b} continues from its state", after, again, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,bi", CASES, ids=CASE_IDS)
def test_encode_positions_generate_and_score(arch, bi):
    m = model(arch, bi)
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    at = m.encode(ids, positions=[1, 4, 10])
    for p, st in zip([1, 4, 10], at, strict=True):
        ref = m.encode(ids[:, :p])
        assert st.tokens == (p, p)
        assert_close(f"ssm after {p}", ref.ssm, st.ssm, rtol=1e-4, atol=1e-5)
        assert_close(f"conv after {p}", ref.conv, st.conv, rtol=1e-4, atol=1e-5)
    lengths = torch.tensor([10, 6])
    out = m.generate(ids, 4, lengths=lengths)
    for b in range(2):
        one = m.generate(ids[b : b + 1, : lengths[b]], 4)
        assert torch.equal(one.tokens[0], out.tokens[b])
        assert out.state.tokens[b] == int(lengths[b]) + 4
    sc = m.score(ids, lengths=lengths)
    assert sc.mask.sum().item() == 9 + 5 and torch.isfinite(sc.perplexity).all()


@pytest.mark.parametrize("arch", ["gated_ssm", "hawk", "mamba2", "transformer"])
def test_state_files_store_and_mixing(arch, tmp_path):
    from statelab import StateStore, load_state, mix
    from statelab.errors import StateMismatchError as SME

    m = model(arch, True)
    ids = torch.randint(0, 40, (1, 8), generator=torch.Generator().manual_seed(3))
    st = m.encode(ids)
    st.save(tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors", model=m)
    assert back.equal(st)
    nxt = torch.randint(0, 40, (1, 3))
    assert torch.equal(m(nxt, st)[0], m(nxt, back)[0])
    store = StateStore(tmp_path / "store")
    store.add(st, "skill")
    assert store.get("skill", model=m).equal(st)
    if arch == "transformer":
        with pytest.raises(SME, match="key/value caches"):
            mix([st, st], method="mean")
        return
    assert_close("mean of identical states", st.ssm, mix([st, st], method="mean").ssm)
    with pytest.raises(SME, match="track no ΣΔ"):
        mix([st, st], method="adecay", A=torch.zeros(1))

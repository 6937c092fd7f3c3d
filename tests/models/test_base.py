"""StatefulLM: the state-dtype policy of check_state and the shared assembly of per-layer states into States."""

import re

import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.layers.mamba2 import Mamba2LayerState
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM

M1 = Mamba1Config(d_model=16, n_layer=2, vocab_size=29, d_state=4, d_conv=4)
M2 = Mamba2Config(vocab_size=29, d_model=12, n_layer=2, d_state=8, head_dim=6, n_groups=2, d_conv=4)

# (model, the dtype its own states come in, a dtype it must refuse)
CASES = {
    "mamba1-fp32": (lambda: Mamba1LM(M1), torch.float32, torch.float64),
    "mamba1-bf16": (lambda: Mamba1LM(M1).to(torch.bfloat16), torch.bfloat16, torch.float32),
    "mamba2-fp32": (lambda: Mamba2LM(M2), torch.float32, torch.float64),
    "mamba2-bf16": (lambda: Mamba2LM(M2).to(torch.bfloat16), torch.float32, torch.bfloat16),
}


def _ids(T, B=2, seed=1):
    return torch.randint(0, 29, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@torch.no_grad()
def test_a_model_accepts_its_own_state_dtype_and_refuses_another(case):
    make, own, wrong = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    assert model.zero_state(2).dtype == own
    s = model.encode(_ids(5))
    assert s.dtype == own and s.sum_delta.dtype == torch.float32
    s = s.to(dtype=wrong).to(dtype=own)  # values the wrong dtype holds exactly, so that the fix below is exact
    logits, s2 = model(_ids(4, seed=2), state=s)
    assert s2.dtype == own

    bad = s.to(dtype=wrong)
    message = re.escape(f"state dtype {wrong} differs from the {own}") + r".*" + re.escape(f"state.to(dtype={own})")
    with pytest.raises(StateMismatchError, match=message):
        model(_ids(4, seed=2), state=bad)
    with pytest.raises(StateMismatchError, match=message):
        model.encode(_ids(4, seed=2), state=bad, positions=[2])
    with pytest.raises(StateMismatchError, match=message):
        model.check_state(bad)

    # the fix the message names gives back the very state
    again, s3 = model(_ids(4, seed=2), state=bad.to(dtype=own))
    assert torch.equal(again, logits) and torch.equal(s3.ssm, s2.ssm) and torch.equal(s3.conv, s2.conv)


def test_assemble_states_stacks_layers_casts_and_counts_tokens():
    torch.manual_seed(0)
    model = Mamba2LM(M2)
    L, B, H, P, N, C, K = 2, 3, M2.n_heads, M2.head_dim, M2.d_state, M2.conv_dim, M2.d_conv

    def layer(seed):
        g = torch.Generator().manual_seed(seed)
        return Mamba2LayerState(
            torch.randn(B, C, K - 1, generator=g, dtype=torch.float64),
            torch.randn(B, H, P, N, generator=g, dtype=torch.float64),
            torch.rand(B, H, generator=g, dtype=torch.float64),
        )

    final = [layer(i) for i in range(L)]
    at = [[layer(10 * i + k) for k in range(2)] for i in range(1, L + 1)]
    new, states_at = model._assemble_states(final, at, [1, 6], (5, 5, 5), (7, 7, 7), torch.float32)
    assert new.n_tokens == 12 and [s.n_tokens for s in states_at] == [6, 11]
    assert new.fingerprint == model.fingerprint and new.arch == "mamba2"
    for s, parts in [(new, final), *((states_at[k], [a[k] for a in at]) for k in range(2))]:
        assert s.ssm.dtype == s.conv.dtype == s.sum_delta.dtype == torch.float32
        for i in range(L):
            assert torch.equal(s.ssm[i], parts[i].ssm.float()) and torch.equal(s.conv[i], parts[i].conv.float())
            assert torch.equal(s.sum_delta[i], parts[i].sum_delta.float())

    stacked = torch.full((L, B, H, P, N), 7.0)
    new, none = model._assemble_states(final, [], None, (0, 0, 0), (3, 3, 3), torch.float32, stacked)
    assert none is None and new.n_tokens == 3 and new.ssm is stacked
    assert torch.equal(new.conv, torch.stack([f.conv for f in final]).float())


# ---- bad values: NaN/inf states, ids outside the vocabulary ----------------------------------------------------
CALLS = {
    "forward": lambda m, ids, s: m(ids, state=s),
    "encode": lambda m, ids, s: m.encode(ids, state=s),
    "score": lambda m, ids, s: m.score(ids, state=s),
    "generate": lambda m, ids, s: m.generate(ids, 3, state=s),
}


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("part, value", [("ssm", float("nan")), ("ssm", float("inf")), ("conv", float("-inf"))])
@torch.no_grad()
def test_a_nan_or_inf_state_is_refused_by_every_call(arch, part, value):
    torch.manual_seed(0)
    model = (Mamba1LM(M1) if arch == "mamba1" else Mamba2LM(M2)).eval()
    s = model.encode(_ids(5))
    t = getattr(s, part).clone()
    t.view(-1)[3] = value
    bad = s.replace(**{part: t})
    for call in CALLS.values():
        with pytest.raises(StateMismatchError, match=rf"state part\(s\) \['{part}'\] hold NaN/inf"):
            call(model, _ids(4, seed=2), bad)
    # an unknown ΣΔ (NaN, as a state imported from a transformers cache has) is not a broken state
    unknown = s.replace(sum_delta=torch.full_like(s.sum_delta, float("nan")))
    logits, _ = model(_ids(4, seed=2), state=unknown)
    assert torch.equal(logits, model(_ids(4, seed=2), state=s)[0])


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("bad_id", [-1, 29, 10_000])
@torch.no_grad()
def test_ids_outside_the_vocabulary_are_a_clear_error(arch, bad_id):
    model = (Mamba1LM(M1) if arch == "mamba1" else Mamba2LM(M2)).eval()
    V = model.embedding.num_embeddings
    ids = _ids(5)
    ids[1, 2] = bad_id
    for call in CALLS.values():
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {V}\) .*vocabulary has {V} entries"):
            call(model, ids, None)
    ok = ids.clamp(0, V - 1)
    model(ok)  # the range is exactly the embedding's


# ---- dtype: the same checkpoint in another dtype -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@torch.no_grad()
def test_a_state_of_the_same_checkpoint_in_another_dtype_names_dtype_and_the_fix(tmp_path, arch):
    from statelab.models.loading import load_model
    from statelab.state.io import load_state

    torch.manual_seed(0)
    (Mamba1LM(M1) if arch == "mamba1" else Mamba2LM(M2)).save_pretrained(tmp_path / "ckpt")
    fp32 = load_model(tmp_path / "ckpt")
    bf16 = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    s = fp32.encode(_ids(5, B=1))
    for refuse in (lambda: bf16(_ids(3, B=1), state=s), lambda: bf16.check_state(s)):
        with pytest.raises(StateMismatchError, match="same checkpoint loaded in float32") as e:
            refuse()
        assert "dtype=torch.float32" in str(e.value) and "adopt_state" in str(e.value)
    path = s.save(tmp_path / "s.safetensors")
    with pytest.raises(StateMismatchError, match="same checkpoint loaded in float32"):
        load_state(path, bf16)
    # the other direction too: the fp32 model is told the state came from bfloat16
    with pytest.raises(StateMismatchError, match="same checkpoint loaded in bfloat16"):
        fp32.check_state(bf16.encode(_ids(5, B=1)))

    # the explicit take-over: cast to the bf16 model's state dtype, stamped with its fingerprint, usable
    adopted = bf16.adopt_state(s)
    assert adopted.fingerprint == bf16.fingerprint and adopted.dtype == bf16.zero_state(1).dtype
    assert torch.equal(adopted.ssm, s.ssm.to(adopted.dtype)) and s.fingerprint == fp32.fingerprint
    logits, _ = bf16(_ids(3, B=1), state=adopted)
    ref, _ = fp32(_ids(3, B=1), state=s)
    assert torch.allclose(logits.float(), ref, atol=0.05, rtol=0.05)

    # a model that was not loaded from a directory, or another model's state: no dtype hint, no adoption
    other = Mamba1LM(M1) if arch == "mamba1" else Mamba2LM(M2)
    with pytest.raises(StateMismatchError, match="not by this model") as e:
        other.check_state(s)
    assert "checkpoint" not in str(e.value)
    with pytest.raises(StateMismatchError, match="cannot adopt"):
        other.adopt_state(s)
    with pytest.raises(StateMismatchError, match="cannot adopt"):
        bf16.adopt_state(other.encode(_ids(5, B=1)))

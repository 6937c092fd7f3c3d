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

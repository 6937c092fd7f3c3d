"""Padded batches against transformers 5.23 on the same random weights.

Where the two agree (asserted): with left padding and ``attention_mask``, transformers' logits at real positions,
its cache and its greedy ``generate`` equal each row alone, and so do statelab's. Where they differ (asserted, so
that the claim in docs/ragged-batches.md stays true for the pinned version): after a *right*-padded prefill,
transformers' cache of a short row is not the row's state (its conv window holds padding and its SSM state has
decayed through the padded steps; transformers #48256), while statelab's state equals the row alone.
"""

import tempfile
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Mamba2Config as HFMamba2Config  # noqa: E402
from transformers import Mamba2ForCausalLM, MambaConfig, MambaForCausalLM  # noqa: E402

from statelab.models.loading import load_model  # noqa: E402
from statelab.state.interop import from_hf_cache  # noqa: E402
from statelab.testing import assert_close  # noqa: E402

V, T, LENGTHS = 37, 20, [3, 11, 20, 7]


def _mamba1():
    cfg = MambaConfig(vocab_size=V, hidden_size=24, state_size=5, num_hidden_layers=2, conv_kernel=4)
    m = MambaForCausalLM(cfg)
    with torch.no_grad():
        for layer in m.backbone.layers:
            layer.mixer.dt_proj.bias.add_(1.0)
    return m.eval()


def _mamba2():
    cfg = HFMamba2Config(vocab_size=V, hidden_size=16, num_heads=4, head_dim=8, state_size=8, n_groups=1,
                         num_hidden_layers=2, conv_kernel=4, chunk_size=8, eos_token_id=None,
                         pad_token_id=0)  # fmt: skip
    m = Mamba2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in m.backbone.layers:
            layer.mixer.dt_bias.add_(1.0)
            layer.mixer.A_log.copy_(torch.randn_like(layer.mixer.A_log))
    return m.eval()


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def pair(request):
    torch.manual_seed(0)
    hf = {"mamba1": _mamba1, "mamba2": _mamba2}[request.param]()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(d)
        ours = load_model(d)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, V, (n,), generator=g) for n in LENGTHS]
    return hf, ours, rows


def _pad(rows, side):
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


def _real(side, n):
    return slice(T - n, T) if side == "left" else slice(0, n)


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_at_real_positions_agree(pair, side):
    hf, ours, rows = pair
    ids, mask = _pad(rows, side)
    with torch.no_grad():
        want_batch = hf(ids, attention_mask=mask).logits
        got, _ = ours(ids, attention_mask=mask)
        for b, r in enumerate(rows):
            alone = hf(r[None]).logits[0]
            sl = _real(side, len(r))
            assert_close(f"statelab row {b}", alone, got[b, sl], atol=1e-5 * float(alone.abs().max()))
            assert_close(f"transformers row {b}", alone, want_batch[b, sl], atol=1e-5 * float(alone.abs().max()))


def test_left_padded_greedy_generation_agrees(pair):
    hf, ours, rows = pair
    ids, mask = _pad(rows, "left")
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, T:]
        mine = ours.generate(ids, 8, attention_mask=mask).tokens
        for b, r in enumerate(rows):
            alone = hf.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)[0, len(r):]  # fmt: skip
            assert torch.equal(mine[b], alone) and torch.equal(theirs[b], alone)


@pytest.mark.parametrize("side", ["left", "right"])
def test_states_after_a_padded_prefill(pair, side):
    hf, ours, rows = pair
    ids, mask = _pad(rows, side)
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, use_cache=True)
        theirs = from_hf_cache(out.cache_params, ours, n_tokens=T)
        _, mine = ours(ids, attention_mask=mask)
        for b, r in enumerate(rows):
            _, alone = ours(r[None])
            assert_close(f"statelab ssm row {b}", alone.ssm, mine.select(b).ssm)
            assert_close(f"statelab conv row {b}", alone.conv, mine.select(b).conv)
            assert mine.tokens[b] == len(r)
            conv_gap = float((theirs.select(b).conv - alone.conv).abs().max())
            if side == "left" or len(r) == T:
                assert_close(f"transformers ssm row {b}", alone.ssm, theirs.select(b).ssm)
                assert conv_gap < 1e-5
            else:  # transformers #48256: a right-padded row's cache is not its state
                assert conv_gap > 0.1

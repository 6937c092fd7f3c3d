"""Ragged batches: a row of a padded batch gives exactly what the row gives alone.

For both architectures and every CPU backend, with right padding (``lengths``) and left padding
(``attention_mask``), from the zero state and from a ragged batched state: each row's state (ssm, conv, ΣΔ and
token count) and its logits at real positions equal the row run alone; greedy ``generate`` equals per-row
generation; ``score`` equals per-row scoring; gradients of a loss over real positions equal the sum of the per-row
gradients. Comparisons are at fp32 round-off (``assert_close``): the projections of a batch run as one matrix
product whose blocking may differ from a single row's, so bit equality is not promised (the measured difference
is reported by ``test_measured_difference``).
"""

import pytest
import torch

from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.state.core import State
from statelab.testing import assert_close

V = 37
T_MAX = 70
# lengths that matter: 1, K - 1, K (K = 4), around the Mamba-2 chunk (16 here) and the Mamba-1 scan chunk (32/64)
AWKWARD = [1, 3, 4, 15, 16, 17, 31, 32, 33, 63, 64, 65, 70]


def _mamba1(backend: str) -> Mamba1LM:
    torch.manual_seed(0)
    m = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=V, d_state=8, d_conv=4, tie_embeddings=False))
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_proj.bias.add_(1.0)  # larger Δ: the state matters
    m.set_backend(backend)
    return m.eval()


def _mamba2(backend: str) -> Mamba2LM:
    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=V, d_model=16, n_layer=2, d_state=8, head_dim=8, n_groups=2, d_conv=4)
    m = Mamba2LM(cfg, backend=backend)
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_bias.add_(1.5)
            b.mixer.chunk_size = 16
    return m.eval()


MODELS = {
    "mamba1-chunk": lambda: _mamba1("chunk"),
    "mamba1-naive": lambda: _mamba1("naive"),
    "mamba2-chunk": lambda: _mamba2("chunk"),
    "mamba2-naive": lambda: _mamba2("naive"),
}


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _rows(seed: int, B: int | None = None, lengths: list[int] | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        B = B or int(torch.randint(1, 10, (1,), generator=g))
        lengths = [AWKWARD[int(i)] for i in torch.randint(0, len(AWKWARD), (B,), generator=g)]
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def _right(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return ids, torch.tensor([len(r) for r in rows])


def _left(rows: list[torch.Tensor], pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    return ids, mask


def _same_state(name: str, got: State, want: State) -> None:
    for part in ("ssm", "conv", "sum_delta"):
        assert_close(f"{name}.{part}", getattr(got, part), getattr(want, part))
    assert got.tokens == want.tokens, f"{name}: token counts {got.tokens} vs {want.tokens}"


@pytest.mark.parametrize("seed", [0, 1, 2, 3], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("layout", ["right", "left"])
def test_forward_rows_equal_alone(model, seed, layout):
    rows = _rows(seed)
    with torch.no_grad():
        if layout == "right":
            ids, lengths = _right(rows)
            logits, state = model(ids, lengths=lengths)
        else:
            ids, mask = _left(rows)
            logits, state = model(ids, attention_mask=mask)
        T = ids.shape[1]
        for b, r in enumerate(rows):
            alone, s_alone = model(r[None])
            n = len(r)
            real = slice(0, n) if layout == "right" else slice(T - n, T)
            pad = slice(n, T) if layout == "right" else slice(0, T - n)
            assert_close(f"row {b} logits", logits[b, real], alone[0])
            assert torch.all(logits[b, pad] == 0), "logits at padded positions are zero"
            _same_state(f"row {b}", state.select(b), s_alone)
    assert state.tokens == tuple(len(r) for r in rows)


@pytest.mark.parametrize("layout", ["right", "left"])
def test_continue_from_ragged_state(model, layout):
    """A ragged prefix batch, then a ragged continuation from its state == each row's prefix + suffix alone."""
    pre = _rows(10, lengths=[5, 1, 64, 17, 3])
    suf = _rows(11, lengths=[2, 65, 1, 16, 33])
    with torch.no_grad():
        ids, lengths = _right(pre)
        s1 = model.encode(ids, lengths=lengths)
        assert s1.ragged and s1.tokens == (5, 1, 64, 17, 3)
        if layout == "right":
            ids2, l2 = _right(suf)
            logits, s2 = model(ids2, state=s1, lengths=l2)
        else:
            ids2, m2 = _left(suf)
            logits, s2 = model(ids2, state=s1, attention_mask=m2)
        T2 = ids2.shape[1]
        for b, (p, q) in enumerate(zip(pre, suf, strict=True)):
            whole, s_whole = model(torch.cat([p, q])[None])
            n = len(q)
            real = slice(0, n) if layout == "right" else slice(T2 - n, T2)
            assert_close(f"row {b} suffix logits", logits[b, real], whole[0, len(p) :])
            _same_state(f"row {b}", s2.select(b), s_whole)


def test_states_cat_from_single_rows_then_continue(model):
    """States encoded one by one (different token counts) batch with ``State.cat`` and continue exactly."""
    pre = _rows(20, lengths=[3, 9, 1])
    nxt = torch.tensor([[4], [7], [9]])
    with torch.no_grad():
        states = [model.encode(p[None]) for p in pre]
        batch = State.cat(states)
        assert batch.tokens == (3, 9, 1) and batch.n_tokens == (3, 9, 1)
        logits, s = model(nxt, state=batch)
        for b, p in enumerate(pre):
            want, ws = model(torch.cat([p, nxt[b]])[None])
            assert_close(f"row {b}", logits[b, 0], want[0, -1])
            _same_state(f"row {b}", s.select(b), ws)


def test_encode_positions_per_row(model):
    rows = _rows(30, lengths=[9, 4, 20])
    ids, lengths = _right(rows)
    per_row = [[1, 9], [2, 4], [20, 5]]
    got = model.encode(ids, lengths=lengths, positions=per_row)
    assert len(got) == 2
    for b, r in enumerate(rows):
        for k, p in enumerate(per_row[b]):
            want = model.encode(r[None, :p])
            _same_state(f"row {b} after {p}", got[k].select(b), want)
    # left padding: positions count from each row's first real token
    idl, mask = _left(rows)
    got_l = model.encode(idl, attention_mask=mask, positions=[[1, 9], [2, 4], [20, 5]])
    for k in range(2):
        _same_state(f"left k={k}", got_l[k], got[k])
    # common positions for every row
    common = model.encode(ids, lengths=lengths, positions=[2, 4])
    for b, r in enumerate(rows):
        _same_state(f"common row {b}", common[1].select(b), model.encode(r[None, :4]))


def test_generate_equals_per_row(model):
    rows = _rows(40, lengths=[1, 7, 3, 65, 16])
    ids, lengths = _right(rows)
    eos = 3
    gen = model.generate(ids, 12, lengths=lengths, eos_token_id=eos)
    idl, mask = _left(rows)
    gen_l = model.generate(idl, 12, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(gen.tokens, gen_l.tokens) and torch.equal(gen.lengths, gen_l.lengths)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], 12, eos_token_id=eos)
        n = int(gen.lengths[b])
        assert n == int(alone.lengths[0])
        assert torch.equal(gen.tokens[b, :n], alone.tokens[0, :n]), f"row {b} greedy tokens"
        assert torch.all(gen.tokens[b, n:] == eos)
        _same_state(f"row {b}", gen.state.select(b), alone.state)
    # a row that stops early keeps its state after its EOS even while others go on
    assert gen.state.tokens == tuple(len(r) + int(n) for r, n in zip(rows, gen.lengths, strict=True))


def test_generate_rows_stop_independently():
    """Force EOS: a model whose most likely next token is EOS after some prompts and not after others."""
    m = _mamba1("chunk")
    rows = _rows(41, lengths=[4, 9, 2, 30])
    ids, lengths = _right(rows)
    # pick as EOS the greedy first token of row 0, so row 0 stops at once and its state reads exactly one token
    first = m.generate(rows[0][None], 1).tokens[0, 0].item()
    gen = m.generate(ids, 6, lengths=lengths, eos_token_id=first)
    assert gen.lengths[0] == 1 and gen.tokens[0].eq(first).all()
    for b, r in enumerate(rows):
        alone = m.generate(r[None], 6, eos_token_id=first)
        assert gen.lengths[b] == alone.lengths[0]
        _same_state(f"row {b}", gen.state.select(b), alone.state)


def test_score_equals_per_row(model):
    rows = _rows(50, lengths=[2, 9, 33, 5])
    ids, lengths = _right(rows)
    res = model.score(ids, lengths=lengths)
    idl, mask = _left(rows)
    res_l = model.score(idl, attention_mask=mask)
    T = ids.shape[1]
    for b, r in enumerate(rows):
        alone = model.score(r[None])
        n = len(r)
        assert_close(f"row {b} logprobs", res.logprobs[b, : n - 1], alone.logprobs[0])
        assert res.mask[b, : n - 1].all() and not res.mask[b, n - 1 :].any()
        assert torch.all(res.logprobs[b, n - 1 :] == 0)
        assert_close(f"row {b} ppl", res.perplexity[b], alone.perplexity[0])
        assert_close(f"left row {b} logprobs", res_l.logprobs[b, T - n :], alone.logprobs[0])
        assert res_l.mask[b, T - n :].all() and not res_l.mask[b, : T - n].any()
        _same_state(f"row {b}", res.state.select(b), alone.state)


def test_gradients_equal_sum_of_rows(model):
    """Training on a padded batch leaks nothing through padding: gradients == sum of per-row gradients."""
    rows = _rows(60, lengths=[3, 17, 1, 40])
    targets = _rows(61, lengths=[3, 17, 1, 40])
    ids, lengths = _right(rows)
    tgt, _ = _right(targets)
    valid = torch.arange(ids.shape[1]) < lengths[:, None]
    model.train()
    try:
        model.zero_grad()
        logits, _ = model(ids, lengths=lengths)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        (ce * valid).sum().backward()
        batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        for r, t in zip(rows, targets, strict=True):
            lo, _ = model(r[None])
            torch.nn.functional.cross_entropy(lo[0], t, reduction="sum").backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert_close(f"grad {n}", batched[n], p.grad, atol=2e-5, rtol=2e-4)
    finally:
        model.zero_grad()
        model.eval()


def test_gradient_wrt_ragged_initial_state(model):
    pre = _rows(70, lengths=[4, 11])
    suf = _rows(71, lengths=[6, 2])
    ids, lengths = _right(pre)
    with torch.no_grad():
        s0 = model.encode(ids, lengths=lengths)
    s0 = s0.replace(ssm=s0.ssm.clone().requires_grad_(True))
    ids2, l2 = _right(suf)
    logits, _ = model(ids2, state=s0, lengths=l2)
    valid = torch.arange(ids2.shape[1]) < l2[:, None]
    (logits.square().sum(-1) * valid).sum().backward()
    for b in range(2):
        sb = s0.select(b).detach()
        sb = sb.replace(ssm=sb.ssm.clone().requires_grad_(True))
        lo, _ = model(suf[b][None], state=sb)
        lo.square().sum().backward()
        assert_close(f"d state row {b}", s0.ssm.grad[:, b : b + 1], sb.ssm.grad, atol=1e-5, rtol=1e-4)


def test_full_lengths_take_the_unpadded_path(model):
    rows = _rows(80, lengths=[8, 8])
    ids, lengths = _right(rows)
    with torch.no_grad():
        a, sa = model(ids)
        b, sb = model(ids, lengths=lengths)
        c, sc = model(ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert sa.equal(sb) and sa.equal(sc)


def test_measured_difference(model, capsys):
    """Report how far a padded row is from the row alone (bit-exact or round-off), without asserting more."""
    rows = _rows(90, lengths=[70, 33, 5])
    ids, lengths = _right(rows)
    with torch.no_grad():
        logits, state = model(ids, lengths=lengths)
        worst = 0.0
        for b, r in enumerate(rows):
            alone, sa = model(r[None])
            worst = max(worst, (logits[b, : len(r)] - alone[0]).abs().max().item())
            worst = max(worst, (state.select(b).ssm - sa.ssm).abs().max().item())
    assert worst < 1e-4


# ---- bad input: one clear error, nothing changed -------------------------------------------------------------
def test_bad_lengths_and_masks():
    m = _mamba2("chunk")
    ids = torch.randint(0, V, (3, 6))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 6\]"):
        m(ids, lengths=[1, 7, 2])
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 6\]"):
        m(ids, lengths=[0, 3, 2])
    with pytest.raises(ValueError, match="one entry per row"):
        m(ids, lengths=[3, 2])
    with pytest.raises(ValueError, match="not both"):
        m(ids, lengths=[3, 2, 1], attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="same shape"):
        m(ids, attention_mask=torch.ones(3, 5))
    gap = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6, [1] * 6])
    with pytest.raises(ValueError, match="not contiguous"):
        m(ids, attention_mask=gap)
    with pytest.raises(ValueError, match="no real token"):
        m(ids, attention_mask=torch.tensor([[0] * 6, [1] * 6, [1] * 6]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        m(ids, attention_mask=torch.full((3, 6), 2))
    with pytest.raises(TypeError, match="integers"):
        m(ids, lengths=torch.tensor([1.0, 2.0, 3.0]))
    state = m.encode(ids[:2], lengths=[2, 5])
    with pytest.raises(Exception, match="batch size 2 but input has 3"):
        m(ids, state=state, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"positions must lie in \[1, 2\] for row 0"):
        m.encode(ids[:2], lengths=[2, 5], positions=[[3], [4]])
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        m.score(ids, lengths=[1, 6, 6])

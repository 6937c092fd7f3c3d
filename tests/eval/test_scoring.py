"""The scoring core: every batched result equals the same request run alone with plain ``model(ids)`` calls.

Both architectures, with and without a start state, with a token budget small enough to force several buckets
and the chunked path for long rows. Log-likelihoods are compared at fp32 round-off, greedy flags and generated
strings exactly.
"""

import pytest
import torch

from statelab.eval.scoring import (
    GenRequest,
    encode_pair,
    generate_until,
    loglikelihood,
    loglikelihood_rolling,
    parse_gen_kwargs,
    prefix_token_id,
)
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
V = TOK.vocab_size


def _ascii_head(w):
    """Peaked predictions (greedy continuations exist, argmax ties do not) over ASCII: the other ids get logit 0,
    below the best of 128 random logits, so greedy text decodes and re-encodes to the same bytes."""
    w.mul_(400.0)
    w[128:] = 0.0


def _mamba1():
    torch.manual_seed(0)
    m = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=V, d_state=8, tie_embeddings=False))
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_proj.bias.add_(1.0)
        _ascii_head(m.lm_head.weight)
    return m.eval()


def _mamba2():
    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=V, d_model=16, n_layer=2, d_state=8, head_dim=8, n_groups=2, tie_embeddings=False)
    m = Mamba2LM(cfg)
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_bias.add_(1.5)
            b.mixer.chunk_size = 16
        _ascii_head(m.lm_head.weight)
    return m.eval()


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model(request):
    return _mamba1() if request.param == "mamba1" else _mamba2()


@pytest.fixture(scope="module", params=["zero", "skill"])
def start(request, model):
    if request.param == "zero":
        return None
    return model.encode(torch.tensor([TOK.encode("Q: cat\nA: CAT\n\nQ: dog\nA: DOG\n\n")]))


@torch.no_grad()
def _logits(model, ids, state):
    logits, _ = model(torch.tensor([ids]), state=state)
    return logits[0].float()


def _ref_ll(model, ctx, cont, state):
    """Alone: one plain pass over context + continuation from the start state."""
    if not cont:
        return 0.0, True
    logp = torch.log_softmax(_logits(model, ctx + cont, state), -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    lp = sum(float(logp[p, t]) for p, t in zip(pos, cont, strict=True))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(pos, cont, strict=True))
    return lp, greedy


def _mc_requests(model, start):
    contexts = ["Q: apple\nA:", "Q: a much longer question about a banana\nA: ", "x", "", "   "]
    conts = [" APPLE", "\n", " a longer answer that runs on", ""]
    reqs = [(c, x) for c in contexts for x in conts]
    # make some continuations the greedy ones, so that is_greedy is true somewhere
    reqs += [(c, TOK.decode(_free_tokens(model, c, 3, start))) for c in contexts if c == c.rstrip()]
    return reqs


def test_loglikelihood_equals_one_at_a_time(model, start):
    reqs = _mc_requests(model, start)
    want = [_ref_ll(model, *encode_pair(TOK, c, x), start) for c, x in reqs]
    # one pass for all; several buckets with a long row read in chunks; at most 2 rows per pass
    for batch_tokens, max_rows in ((4096, None), (24, None), (4096, 2)):
        got = loglikelihood(model, TOK, reqs, state=start, batch_tokens=batch_tokens, max_rows=max_rows)
        assert len(got) == len(reqs)
        for (c, x), (lp, g), (want_lp, want_g) in zip(reqs, got, want, strict=True):
            assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4), (c, x, batch_tokens)
            assert g == want_g, (c, x, batch_tokens)
    scored = [w for (c, x), w in zip(reqs, want, strict=True) if encode_pair(TOK, c, x)[1]]
    assert sum(g for _, g in scored) >= 3 and sum(not g for _, g in scored) >= 3
    assert all(lp <= 0 for lp, _ in scored)


def test_each_context_is_read_once(model):
    calls = []
    orig = model.encode

    def spy(ids, *args, **kwargs):
        calls.append((ids.shape[0], kwargs.get("lengths")))
        return orig(ids, *args, **kwargs)

    model.encode = spy
    try:
        reqs = [(c, x) for c in ["Q: one\nA:", "Q: two!\nA:", "Q: three\nA:"] for x in [" A", " BB", " CCC", " D"]]
        loglikelihood(model, TOK, reqs, batch_tokens=4096)
    finally:
        del model.encode
    # one pass, one row per distinct context, each of its tokens but the last
    assert len(calls) == 1 and calls[0][0] == 3
    assert sorted(calls[0][1].tolist()) == sorted(
        len(TOK.encode(c)) - 1 for c in ["Q: one\nA:", "Q: two!\nA:", "Q: three\nA:"]
    )


def test_tokenisation_boundary():
    assert encode_pair(TOK, "Q: x\nA: ", "Y") == (TOK.encode("Q: x\nA:"), TOK.encode(" Y"))
    assert encode_pair(TOK, "", "ab") == ([TOK.bos_token_id], TOK.encode("ab"))
    assert encode_pair(TOK, "  ", "ab") == ([TOK.bos_token_id], TOK.encode("  ab"))
    assert prefix_token_id(TOK) == TOK.bos_token_id
    with pytest.raises(TypeError, match="context"):
        encode_pair(TOK, None, "x")


def test_rolling_equals_one_pass(model, start):
    texts = ["hello world", "", "a", "The quick brown fox jumps over the lazy dog. " * 3, "xyz\n"]
    want = [_ref_ll(model, [TOK.bos_token_id], TOK.encode(t), start)[0] for t in texts]
    for batch_tokens, max_rows in ((4096, None), (16, None), (4096, 2)):
        got = loglikelihood_rolling(model, TOK, texts, state=start, batch_tokens=batch_tokens, max_rows=max_rows)
        assert got[1] == 0.0
        for t, lp, w in zip(texts, got, want, strict=True):
            assert lp == pytest.approx(w, rel=1e-5, abs=1e-4), (t, batch_tokens)


def _free_tokens(model, context, n, state):
    """Greedy tokens after ``context`` alone, each from one plain pass over everything before it."""
    ids = TOK.encode(context) or [TOK.bos_token_id]
    gen = []
    for _ in range(n):
        gen.append(int(_logits(model, ids + gen, state)[-1].argmax()))
    return gen


def _ref_generate(free, g):
    """What generating alone with ``g`` gives: greedy tokens do not depend on the stop rule, which only decides
    where they end (EOS, the limit, or a stop string in the text so far)."""
    gen = []
    for t in free[: g.max_gen_toks]:
        if t == TOK.eos_token_id:
            break
        gen.append(t)
        if any(s in TOK.decode(gen) for s in g.until):
            break
    text = TOK.decode(gen)
    for s in g.until:
        text = text.split(s, 1)[0]
    return text


def test_generate_equals_one_at_a_time(model, start):
    contexts = ["Q: apple\nA:", "Q: a much longer question about a banana\nA: ", "x", ""]
    free = {c: _free_tokens(model, c, 10, start) for c in contexts}
    reqs = []
    for i, c in enumerate(contexts):
        text = TOK.decode(free[c])
        stop = text[3:5] if len(text) >= 5 else "\n"
        reqs.append((c, {"until": [stop], "max_gen_toks": 10}))
        reqs.append((c, {"until": ["\n\n", stop], "max_gen_toks": 3 + i}))
        reqs.append((c, {"max_gen_toks": 0}))
    reqs.append(reqs[0])  # a duplicate request
    want = [_ref_generate(free[c], parse_gen_kwargs(kw)) for c, kw in reqs]
    for batch_tokens, max_rows in ((4096, None), (20, None), (4096, 3)):
        got = generate_until(model, TOK, reqs, state=start, batch_tokens=batch_tokens, max_rows=max_rows)
        assert got == want, batch_tokens
    cut = sum(
        len(w) < len(_ref_generate(free[c], GenRequest((), parse_gen_kwargs(kw).max_gen_toks)))
        for (c, kw), w in zip(reqs, want, strict=True)
    )
    assert cut >= 3  # stop strings really cut some outputs
    assert want[2] == ""


def test_gen_kwargs():
    assert parse_gen_kwargs({"until": "\n", "max_gen_toks": 5}) == GenRequest(("\n",), 5)
    assert parse_gen_kwargs({"until": ["a", ""], "max_new_tokens": 7, "do_sample": False, "temperature": 0.7}) == (
        GenRequest(("a",), 7)
    )
    assert parse_gen_kwargs(None).max_gen_toks == 256
    with pytest.raises(ValueError, match="greedily"):
        parse_gen_kwargs({"do_sample": True})
    with pytest.raises(ValueError, match="greedily"):
        parse_gen_kwargs({"temperature": 0.5})
    with pytest.raises(ValueError, match="max_gen_toks"):
        parse_gen_kwargs({"max_gen_toks": -1})
    with pytest.raises(ValueError, match="until"):
        parse_gen_kwargs({"until": [1]})
    with pytest.raises(ValueError, match="unknown"):
        parse_gen_kwargs({"beam": 3})


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="batch_tokens"):
        loglikelihood(model, TOK, [("a", "b")], batch_tokens=0)
    with pytest.raises(ValueError, match="max_rows"):
        generate_until(model, TOK, [("a", {})], max_rows=0)
    other = _mamba1() if model.arch == "mamba2" else _mamba2()
    foreign = other.encode(torch.tensor([TOK.encode("abc")]))
    with pytest.raises(Exception, match="mamba|model"):
        loglikelihood(model, TOK, [("a", "b")], state=foreign)
    two = model.encode(torch.tensor([TOK.encode("abc"), TOK.encode("abd")]))
    with pytest.raises(Exception, match="batch 1"):
        loglikelihood_rolling(model, TOK, ["abc"], state=two)
    with pytest.raises(TypeError, match="single str"):
        loglikelihood_rolling(model, TOK, "abc")
